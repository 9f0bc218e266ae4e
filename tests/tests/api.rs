//! The HTTP API as its clients meet it, over the real HTTPS listener of a real coordinator,
//! driven by `curl` from the coordinator's namespace: every route's error forms (401 with
//! its challenge, 404, 405, 413, bad bodies), requests the OpenAPI document calls valid
//! are not refused for their shape, and a flood of bad tokens is logged at a bounded rate.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Value};
use zy_lab::site::Site;
use zy_lab::{API_PORT, COORD_IP};

/// What the coordinator's certificate is issued to (its name, whatever address it has).
const HOST: &str = "coordinator.zhengyun";

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}), status {}: {}", self.status, self.body))
    }

    /// The API's error form: `{"error": {"code", "message"}}` as JSON, nothing else.
    fn assert_error(&self, status: u16, what: &str) -> Value {
        assert_eq!(self.status, status, "{what}: {self:?}");
        assert!(
            self.headers
                .get("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "{what}: not JSON: {self:?}"
        );
        let v = self.json();
        let e = &v["error"];
        assert!(
            e["code"].as_str().is_some_and(|c| !c.is_empty())
                && e["message"].as_str().is_some_and(|m| !m.is_empty())
                && v.as_object().map(|o| o.len()) == Some(1),
            "{what}: not the error form: {}",
            self.body
        );
        e.clone()
    }
}

struct Api<'a> {
    site: &'a Site,
    token: String,
    dir: PathBuf,
}

impl<'a> Api<'a> {
    fn new(site: &'a Site) -> Api<'a> {
        let cfg = std::fs::read_to_string(site.cli_config()).unwrap();
        let token = cfg
            .lines()
            .find_map(|l| l.trim().strip_prefix("token = "))
            .map(|v| v.trim().trim_matches('"').to_string())
            .expect("the admin token in zy.toml");
        let dir = site.lab.dir.join("api");
        std::fs::create_dir_all(&dir).unwrap();
        Api { site, token, dir }
    }

    /// One request. `auth`: the whole Authorization value, or none.
    fn call(&self, method: &str, path: &str, auth: Option<&str>, body: Option<&[u8]>) -> Answer {
        let (hdr, out, data) = (
            self.dir.join("headers"),
            self.dir.join("body"),
            self.dir.join("data"),
        );
        let url = format!("https://{HOST}:{API_PORT}{path}");
        let resolve = format!("{HOST}:{API_PORT}:{COORD_IP}");
        let ca = self.site.state.join("ca.crt");
        let mut args: Vec<String> = [
            "netns",
            "exec",
            &self.site.lab.coord_ns(),
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            &ca.to_string_lossy(),
            "--resolve",
            &resolve,
            "-X",
            method,
            "-D",
            &hdr.to_string_lossy(),
            "-o",
            &out.to_string_lossy(),
            "-w",
            "%{http_code}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(a) = auth {
            args.push("-H".into());
            args.push(format!("Authorization: {a}"));
        }
        if let Some(b) = body {
            std::fs::write(&data, b).unwrap();
            args.extend([
                "-H".into(),
                "Content-Type: application/json".into(),
                "--data-binary".into(),
                format!("@{}", data.display()),
            ]);
        }
        args.push(url);
        let o = std::process::Command::new("ip")
            .args(&args)
            .output()
            .expect("ip netns exec curl");
        let status: u16 = String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| {
                panic!(
                    "curl {method} {path}: {}",
                    String::from_utf8_lossy(&o.stderr)
                )
            });
        let headers = std::fs::read_to_string(&hdr)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let body = std::fs::read_to_string(&out).unwrap_or_default();
        Answer {
            status,
            headers,
            body,
        }
    }

    fn authed(&self, method: &str, path: &str, body: Option<&[u8]>) -> Answer {
        self.call(method, path, Some(&format!("Bearer {}", self.token)), body)
    }
}

/// The document's paths with their parameters filled in with names that exist nowhere.
fn concrete(path: &str) -> String {
    path.replace("{node}", "zz-none")
        .replace("{vm}", "zz-none")
        .replace("{name}", "zz-none")
        .replace("{id}", "00000000deadbeef")
}

#[test]
fn every_route_answers_errors_in_the_apis_form() {
    let site = Site::new(0).expect("site");
    let api = Api::new(&site);
    let doc: Value = serde_json::from_str(zy_coordinator::api::OPENAPI).unwrap();
    let open = ["/v1/health", "/v1/openapi.json"];
    let big = vec![b'a'; zy_coordinator::api::BODY_LIMIT + 1];
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let url = concrete(path);
        let methods: Vec<&str> = ops
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .filter(|m| ["get", "post", "put", "delete"].contains(m))
            .collect();
        for m in &methods {
            let method = m.to_ascii_uppercase();
            let op = &ops[*m];
            let what = format!("{method} {path}");
            let listed = |status: u16| op["responses"].get(status.to_string()).is_some();
            if open.contains(&path.as_str()) {
                assert_eq!(api.call(&method, &url, None, None).status, 200, "{what}");
                continue;
            }
            // No token, a token of another scheme, a token that is not one, a wrong one.
            for auth in [None, Some("Basic YTpi"), Some("Bearer nonsense")] {
                let a = api.call(&method, &url, auth, None);
                a.assert_error(401, &what);
                let challenge = a
                    .headers
                    .get("www-authenticate")
                    .cloned()
                    .unwrap_or_default();
                assert!(challenge.starts_with("Bearer"), "{what}: {a:?}");
                if auth == Some("Bearer nonsense") {
                    assert!(challenge.contains("invalid_token"), "{what}: {challenge}");
                }
            }
            // The scheme in any case.
            let lower = api.call(&method, &url, Some(&format!("bearer {}", api.token)), None);
            assert_ne!(lower.status, 401, "{what}: {lower:?}");
            // Any error it gives is the API's form, with a status the document lists.
            if lower.status >= 400 {
                lower.assert_error(lower.status, &what);
                assert!(
                    listed(lower.status),
                    "{what}: answered {} which the document does not list",
                    lower.status
                );
            }
            if op.get("requestBody").is_some() && path != "/v1/blobs" {
                api.authed(&method, &url, Some(&big))
                    .assert_error(413, &format!("{what} with a body over the limit"));
                let e = api
                    .authed(&method, &url, Some(b"{not json"))
                    .assert_error(400, &format!("{what} with garbage"));
                assert_eq!(e["code"], "bad_request");
            }
        }
        // A method the path does not take.
        let other = ["PATCH", "PUT", "POST", "DELETE"]
            .into_iter()
            .find(|m| !methods.contains(&m.to_ascii_lowercase().as_str()))
            .unwrap();
        let a = api.authed(other, &url, None);
        let e = a.assert_error(405, &format!("{other} {path}"));
        assert_eq!(e["code"], "method_not_allowed");
    }
    let e = api
        .authed("GET", "/v1/no-such-thing", None)
        .assert_error(404, "an unknown path");
    assert_eq!(e["code"], "not_found");
    let e = api
        .call("GET", "/v1/no-such-thing", None, None)
        .assert_error(404, "an unknown path without a token");
    assert_eq!(e["code"], "not_found");
    // A bad image name is called an image name.
    let e = api
        .authed(
            "POST",
            "/v1/images",
            Some(br#"{"name":"Bad_Name","kernel":"0000000000000000000000000000000000000000000000000000000000000000","shared":true}"#),
        )
        .assert_error(400, "a bad image name");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("image name") && !msg.contains("node"), "{msg}");
}

/// Builds a request from the document's schema: every required property at its lower or
/// upper bound (`high`), names as long or short as the pattern allows.
fn at_bounds(doc: &Value, schema: &str, high: bool, base: &Value) -> Value {
    let s = &doc["components"]["schemas"][schema];
    let name = &doc["components"]["schemas"]["Name"];
    let mut out = base.clone();
    for (k, p) in s["properties"].as_object().unwrap() {
        if p["$ref"] == "#/components/schemas/Name" && !base.get(k).is_some_and(|v| v.is_string()) {
            let len = if high {
                name["maxLength"].as_u64().unwrap()
            } else {
                name["minLength"].as_u64().unwrap()
            };
            out[k] = json!("z".repeat(len as usize));
        }
        if p["type"] == "integer" && base.get(k).is_none() {
            let b = if high { &p["maximum"] } else { &p["minimum"] };
            if !b.is_null() {
                out[k] = b.clone();
            }
        }
    }
    out
}

#[test]
fn what_the_document_calls_valid_is_not_refused_for_its_shape() {
    let site = Site::new(0).expect("site");
    site.import_guest("guest", "console=ttyS0").expect("import");
    let api = Api::new(&site);
    let doc: Value = serde_json::from_str(zy_coordinator::api::OPENAPI).unwrap();
    for high in [false, true] {
        // A token at either end of its lifetime is made.
        let t = at_bounds(&doc, "CreateToken", high, &json!({"zone": "intranet"}));
        let a = api.authed("POST", "/v1/tokens", Some(t.to_string().as_bytes()));
        assert_eq!(a.status, 201, "{t}: {a:?}");
        // A VM at either end of every bound is taken as a request: with no node to run
        // it, the answer is that there is no room, never that the request is malformed.
        let v = at_bounds(
            &doc,
            "CreateVm",
            high,
            &json!({"zone": "intranet", "image": "guest"}),
        );
        let a = api.authed("POST", "/v1/vms", Some(v.to_string().as_bytes()));
        let e = a.assert_error(409, &format!("{v}"));
        assert_eq!(e["code"], "no_room", "{v}: {e}");
    }
    // One past a bound is refused, and the message gives the real range.
    let over =
        json!({"name": "x", "zone": "intranet", "image": "guest", "vcpus": 65, "memory_mib": 256});
    let e = api
        .authed("POST", "/v1/vms", Some(over.to_string().as_bytes()))
        .assert_error(400, "65 vCPUs");
    assert!(e["message"].as_str().unwrap().contains("1 to 64"), "{e}");
    let over = json!({"name": "x", "zone": "intranet", "image": "guest", "vcpus": 1, "memory_mib": 256, "disk_gib": 65537});
    let e = api
        .authed("POST", "/v1/vms", Some(over.to_string().as_bytes()))
        .assert_error(400, "a 64 TiB + 1 GiB disk");
    assert!(e["message"].as_str().unwrap().contains("disk"), "{e}");
    let long = "z".repeat(64);
    let over =
        json!({"name": long, "zone": "intranet", "image": "guest", "vcpus": 1, "memory_mib": 256});
    let e = api
        .authed("POST", "/v1/vms", Some(over.to_string().as_bytes()))
        .assert_error(400, "a 64-character name");
    assert!(e["message"].as_str().unwrap().contains("VM name"), "{e}");
}

#[test]
fn a_flood_of_bad_tokens_is_logged_at_a_bounded_rate() {
    let site = Site::new(0).expect("site");
    let api = Api::new(&site);
    let wrong = api.token.clone();
    // The same token id with a wrong secret: a client stuck on an old token.
    let (id_part, _) = wrong.rsplit_once('-').expect("zya1-<id>-<secret>");
    let bad = format!(
        "Bearer {id_part}-{}",
        "0".repeat(wrong.len() - id_part.len() - 1)
    );
    for _ in 0..60 {
        api.call("GET", "/v1/nodes", Some(&bad), None)
            .assert_error(401, "a wrong token");
    }
    let log = site.lab.log("coordinator");
    let lines = log
        .lines()
        .filter(|l| l.contains("unknown or wrong token"))
        .count();
    assert!(
        (1..=2).contains(&lines),
        "60 refusals of one token made {lines} log lines"
    );
}
