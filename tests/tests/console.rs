//! The interactive serial console end to end: `zy vm console` on a pseudo-terminal against
//! a VM booted by real QEMU, through the coordinator's WebSocket and the agent's console
//! hub. A command typed is answered by the guest's shell; one session types at a time (a
//! second is refused, `--force` takes over and the first is told); Ctrl-] detaches; the
//! terminal's modes are raw while attached and as they were after; a read-only watcher
//! sees the session live with control sequences removed, and so does `--lines`; a session
//! whose agent dies ends (exit 5), and the restarted agent's re-attached VM has its console.

use std::io::Read;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use zy_api::VmView;
use zy_lab::pty::Pty;
use zy_lab::site::Site;
use zy_lab::wait_for;

const BOOT: Duration = Duration::from_secs(120);
const SAY: Duration = Duration::from_secs(30);

/// `zy vm console <args>` on a pty of its own, in the coordinator's namespace.
fn console(site: &Site, name: &str, args: &[&str]) -> Pty {
    let cfg = site.cli_config().to_string_lossy().into_owned();
    let mut a = vec!["vm", "console"];
    a.extend(args);
    Pty::spawn(
        name,
        &site.lab.coord_ns(),
        &zy_lab::bin("zy"),
        &a,
        &[("ZY_CONFIG", cfg.as_str())],
    )
    .unwrap()
}

/// A child killed and reaped on drop, a panicking test included.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A session `name` on c1 once one is taken (the writer slot or the console may still be
/// coming back).
fn attached(site: &Site, name: &str, what: &str) -> Pty {
    wait_for(what, SAY, || {
        let mut s = console(site, name, &["c1"]);
        match s.wait_for("connected to c1", Duration::from_secs(5)) {
            Ok(()) => Some(s),
            Err(_) => {
                let _ = s.wait_exit(Duration::from_secs(5));
                None
            }
        }
    })
    .unwrap()
}

#[test]
fn the_console_is_a_terminal_with_one_writer_and_detaches() {
    let site = Site::with_agents(&["intranet"]).unwrap();
    site.import_guest("guest", "console=ttyS0 quiet no_timer_check")
        .unwrap();
    site.zy_ok(&[
        "vm", "create", "--name", "c1", "--zone", "intranet", "--memory", "256", "--image", "guest",
    ]);
    wait_for("c1 to run", BOOT, || {
        let v: VmView = site.zy_json(&["vm", "show", "c1"]).unwrap();
        assert_ne!(v.state, "failed", "{:?}", v.reason);
        (v.state == "running").then_some(())
    })
    .unwrap();
    wait_for("the guest's shell", BOOT, || {
        site.zy_ok(&["vm", "console", "c1", "--lines", "50"])
            .contains("ZY-READY c1")
            .then_some(())
    })
    .unwrap();

    // A watcher, read-only and not on a terminal, sees everything live, stripped.
    let cfg = site.cli_config().to_string_lossy().into_owned();
    let mut watcher = Reaped(
        std::process::Command::new("ip")
            .args(["netns", "exec", &site.lab.coord_ns()])
            .arg(zy_lab::bin("zy"))
            .args(["vm", "console", "c1", "--read-only"])
            .env("ZY_CONFIG", &cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let watched = Arc::new(Mutex::new(Vec::new()));
    let (mut out, w) = (watcher.0.stdout.take().unwrap(), watched.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                return;
            }
            w.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });

    // The first session types a command and reads its answer (the answer is not in
    // what was typed, so it is the shell's).
    let mut s1 = console(&site, "s1", &["c1"]);
    let before = s1.modes().unwrap();
    assert!(!before.raw());
    s1.wait_for("connected to c1 (Ctrl-] to detach)", SAY)
        .unwrap();
    assert!(
        s1.modes().unwrap().raw(),
        "the terminal is raw while attached"
    );
    s1.type_(b"\recho zy-$((6*7))-one\r").unwrap();
    s1.wait_for("zy-42-one", SAY).unwrap();
    // Escape sequences reach the terminal as they are.
    s1.type_(b"printf '\\033[1mzy-%s\\033[0m\\n' bold\r")
        .unwrap();
    s1.wait_for("\x1b[1mzy-bold\x1b[0m", SAY).unwrap();

    // A second writer is refused, told how to take over, and leaves its terminal alone.
    let mut s2 = console(&site, "s2", &["c1"]);
    let refused = s2.wait_exit(SAY).unwrap();
    assert_eq!(refused.code(), Some(6), "{}", s2.seen());
    assert!(s2.seen().contains("--force"), "{}", s2.seen());
    assert!(!s2.modes().unwrap().raw());
    s1.type_(b"echo zy-$((6*8))-still\r").unwrap();
    s1.wait_for("zy-48-still", SAY).unwrap();

    // --force takes over: the first is told and exits 8 with its terminal restored.
    let mut s3 = console(&site, "s3", &["c1", "--force"]);
    s3.wait_for("took the console over", SAY).unwrap();
    let taken = s1.wait_exit(SAY).unwrap();
    assert_eq!(taken.code(), Some(8), "{}", s1.seen());
    assert!(
        s1.seen().contains("taken over by another session"),
        "{}",
        s1.seen()
    );
    assert_eq!(s1.modes().unwrap(), before, "s1's terminal is as it was");

    // The new writer types; Ctrl-] detaches with exit 0 and the terminal as it was.
    s3.type_(b"echo zy-$((7*7))-three\r").unwrap();
    s3.wait_for("zy-49-three", SAY).unwrap();
    assert!(!s1.seen().contains("zy-49-three"));
    s3.type_(&[0x1d]).unwrap();
    let detached = s3.wait_exit(SAY).unwrap();
    assert_eq!(detached.code(), Some(0), "{}", s3.seen());
    assert!(s3.seen().contains("detached from c1"), "{}", s3.seen());
    assert_eq!(s3.modes().unwrap(), before, "s3's terminal is as it was");

    // The slot is free again: a plain attach is taken.
    let mut s4 = attached(&site, "s4", "a free console after the detach");

    // The agent dies under a session: it ends, told the node's link was lost (exit 5). A
    // restarted agent re-attaches to the running QEMU, and its console with it.
    site.lab.signal("agent-n1", Signal::SIGKILL);
    let lost = s4.wait_exit(SAY).unwrap();
    assert_eq!(lost.code(), Some(5), "{}", s4.seen());
    assert_eq!(s4.modes().unwrap(), before, "s4's terminal is as it was");
    site.start_agent(1, &[]).unwrap();
    wait_for("the agent to re-attach", SAY, || {
        site.lab
            .log("agent-n1")
            .contains("re-attached to a running VM")
            .then_some(())
    })
    .unwrap();
    site.wait_state("n1", "ready", SAY).unwrap();
    let mut s5 = attached(&site, "s5", "the console after the agent's restart");
    s5.type_(b"echo zy-$((8*8))-again\r").unwrap();
    s5.wait_for("zy-64-again", SAY).unwrap();
    s5.type_(&[0x1d]).unwrap();
    assert_eq!(s5.wait_exit(SAY).unwrap().code(), Some(0), "{}", s5.seen());

    // What was watched, and the log's lines: the session's text, no control bytes.
    wait_for("the watcher to see the third session", SAY, || {
        String::from_utf8_lossy(&watched.lock().unwrap())
            .contains("zy-49-three")
            .then_some(())
    })
    .unwrap();
    drop(watcher);
    let seen = watched.lock().unwrap().clone();
    let lines = site.zy_ok(&["vm", "console", "c1", "--lines", "200"]);
    for (what, text) in [("watched", &seen[..]), ("--lines", lines.as_bytes())] {
        let t = String::from_utf8_lossy(text);
        assert!(
            t.contains("zy-42-one") && t.contains("zy-bold") && t.contains("zy-49-three"),
            "{what}: {t}"
        );
        assert!(
            !text
                .iter()
                .any(|&b| b < 0x20 && b != b'\n' && b != b'\t' || b == 0x7f),
            "{what} holds control bytes: {t:?}"
        );
    }
    site.zy_ok(&["vm", "delete", "c1"]);
}
