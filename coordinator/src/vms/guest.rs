//! What a create request hands the guest, checked before anything is stored: SSH keys
//! ([`zy_common::guest::SshKey`]) and a `#cloud-config` user-data document.
//!
//! The document is passed on to the guest byte for byte, never re-written: cloud-init reads
//! it with a YAML 1.1 parser, where `0644` is octal and `yes` is true, and any YAML 1.2
//! emitter of ours would change such values' meaning. So it is checked here and nothing
//! more: one YAML document whose root is a mapping with plain, unique keys, nested at most
//! [`MAX_DEPTH`] deep. The check reads saphyr-parser's event stream, which needs no
//! recursion; saphyr's tree loader recurses and overflowed a 256 KiB stack on 100 nested
//! brackets, which a daemon must never let a request do. Aliases are not expanded, so a
//! "billion laughs" document costs what its bytes cost.
//!
//! How it meets what Zhengyun writes is cloud-init's own rule (see `vm/seed.rs` on the
//! agent): the keys go in the seed's meta-data, and cloud-init adds them to the document's
//! own `ssh_authorized_keys`; Zhengyun's defaults go in vendor-data, which the document
//! overrides key by key.

use std::collections::HashSet;

use saphyr_parser::{Event, Parser};
use zy_common::guest::{check_ssh_keys, check_user_data, SshKey};

/// How deep mappings and sequences may nest in user-data.
pub const MAX_DEPTH: usize = 32;

/// Checks the keys of a request, each named by its place in the list.
pub fn ssh_keys(lines: &[String]) -> Result<Vec<SshKey>, String> {
    let keys = lines
        .iter()
        .enumerate()
        .map(|(i, l)| SshKey::parse(l).map_err(|e| format!("ssh_keys[{i}] {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    check_ssh_keys(&keys).map_err(|e| format!("ssh_keys: {e}"))?;
    Ok(keys)
}

/// Checks a user-data document: its shape ([`check_user_data`]) and its YAML.
pub fn user_data(text: &str) -> Result<(), String> {
    check_user_data(text).map_err(|e| format!("user_data {e}"))?;
    cloud_config(text).map_err(|e| format!("user_data {e}"))
}

/// One YAML document whose root is a mapping with plain, unique keys, nested at most
/// [`MAX_DEPTH`] deep. An empty document (only the `#cloud-config` line and comments) is
/// taken: cloud-init reads it as no configuration.
fn cloud_config(text: &str) -> Result<(), String> {
    let mut parser = Parser::new_from_str(text);
    let mut depth = 0usize;
    let mut documents = 0usize;
    // At depth 1 inside the root mapping: whether the next node is a key, and the keys seen.
    let mut root_key_next = false;
    let mut root_keys: HashSet<String> = HashSet::new();
    while let Some(event) = parser.next_event() {
        let (event, span) = event.map_err(|e| format!("is not valid YAML: {e}"))?;
        let at = span.start.line();
        // A node at depth 1 in the root mapping alternates key, value.
        let root_node = depth == 1 && documents == 1;
        match event {
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(format!(
                        "holds more than one YAML document (line {at}); cloud-init reads one"
                    ));
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                if depth == 0 && !matches!(event, Event::MappingStart(..)) {
                    return Err("is a YAML list; cloud-config is a mapping of keys".into());
                }
                if root_node && root_key_next {
                    return Err(format!("has a key that is not plain text (line {at})"));
                }
                if root_node {
                    root_key_next = true;
                }
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(format!("nests deeper than {MAX_DEPTH} levels (line {at})"));
                }
                if depth == 1 {
                    root_key_next = true;
                }
            }
            Event::MappingEnd | Event::SequenceEnd => depth = depth.saturating_sub(1),
            Event::Scalar(value, ..) => {
                if depth == 0 {
                    return Err("is a single value; cloud-config is a mapping of keys".into());
                }
                if root_node {
                    if root_key_next && !root_keys.insert(value.to_string()) {
                        return Err(format!("sets `{value}` twice (line {at})"));
                    }
                    root_key_next = !root_key_next;
                }
            }
            Event::Alias(_) => {
                if depth == 0 {
                    return Err("is a single value; cloud-config is a mapping of keys".into());
                }
                if root_node {
                    if root_key_next {
                        return Err(format!("has a key that is not plain text (line {at})"));
                    }
                    root_key_next = true;
                }
            }
            Event::StreamEnd => break,
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDKwxyYVhVBnDWR4OE6Ix9qctTrkxiKMI3txQaLpbjA/ ops@hz-a";

    #[test]
    fn cloud_config_documents_that_are_taken() {
        for ok in [
            "#cloud-config\n",
            "#cloud-config\n# nothing yet\n",
            "#cloud-config\npackages: [nginx]\nruncmd:\n  - [sh, -c, 'echo hi']\n",
            "#cloud-config\n---\nwrite_files:\n  - path: /etc/x\n    permissions: 0644\n    content: |\n      a: b\n",
            "#cloud-config\nbase: &b {a: 1}\nother: *b\nssh_pwauth: yes\n",
            "#cloud-config\nusers:\n  - default\n  - name: ops\n    groups: [sudo]\n",
        ] {
            user_data(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
    }

    #[test]
    fn cloud_config_documents_that_are_refused_say_why() {
        for (bad, want) in [
            (
                "#!/bin/sh\necho hi\n",
                "user_data does not start with a `#cloud-config` line",
            ),
            ("#cloud-config\n- a\n- b\n", "is a YAML list"),
            ("#cloud-config\njust text\n", "is a single value"),
            ("#cloud-config\na: [1, 2\nb: c\n", "is not valid YAML"),
            ("#cloud-config\na: 1\na: 2\n", "sets `a` twice"),
            (
                "#cloud-config\na: 1\n---\nb: 2\n",
                "more than one YAML document",
            ),
            ("#cloud-config\n[x]: 1\n", "key that is not plain text"),
            (
                "#cloud-config\n? {x: 1}\n: 1\n",
                "key that is not plain text",
            ),
        ] {
            let err = user_data(bad).unwrap_err();
            assert!(
                err.contains(want) && err.starts_with("user_data"),
                "{bad:?}: {err}"
            );
        }
        // Nested values may repeat keys of the root; only the root's are checked for twins.
        user_data("#cloud-config\na: {a: 1}\nb: [{a: 1}, {a: 2}]\n").unwrap();
    }

    /// A hostile document cannot overflow the stack: nesting is refused from its events,
    /// on a stack far smaller than a runtime thread's.
    #[test]
    fn deep_nesting_is_refused_without_recursion() {
        let deep = format!(
            "#cloud-config\na: {}{}\n",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let block = format!("#cloud-config\na:\n{}x\n", "- ".repeat(10_000));
        let r = std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || (user_data(&deep), user_data(&block)))
            .unwrap()
            .join()
            .unwrap();
        assert!(r.0.is_err() && r.1.is_err(), "{r:?}");
        let ok = format!(
            "#cloud-config\na: {}{}\n",
            "[".repeat(MAX_DEPTH - 1),
            "]".repeat(MAX_DEPTH - 1)
        );
        user_data(&ok).unwrap();
    }

    #[test]
    fn keys_are_named_by_their_place() {
        assert_eq!(ssh_keys(&[KEY.into()]).unwrap()[0].as_str(), KEY);
        let err = ssh_keys(&[KEY.into(), "ssh-dss AAAA".into()]).unwrap_err();
        assert!(
            err.starts_with("ssh_keys[1] has key type `ssh-dss`"),
            "{err}"
        );
        let err = ssh_keys(&vec![KEY.to_string(); 40]).unwrap_err();
        assert!(err.starts_with("ssh_keys: 40 keys"), "{err}");
    }
}
