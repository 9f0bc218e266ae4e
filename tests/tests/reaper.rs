//! A test run that is killed outright (no drop, no unwinding) leaves namespaces and
//! processes behind; the next lab run reaps them.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use zy_lab::Lab;

/// Not a test on its own: the body of the child process that `reaper_cleans_up_after_a_killed_run`
/// starts and kills.
#[test]
#[ignore = "run by reaper_cleans_up_after_a_killed_run as a child process"]
fn reaper_child() {
    if std::env::var_os("ZY_REAPER_CHILD").is_none() {
        return;
    }
    let lab = Lab::new(1).unwrap();
    lab.spawn(
        &lab.node_ns(1),
        "sleeper",
        std::path::Path::new("/bin/sleep"),
        &["600"],
    )
    .unwrap();
    println!("RUN {} {}", lab.run, lab.pid("sleeper").unwrap());
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn reaper_cleans_up_after_a_killed_run() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "reaper_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("ZY_REAPER_CHILD", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    // libtest may print "test reaper_child ... " on the same line first.
    while !line.contains("RUN ") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "child ended early");
    }
    let at = line.find("RUN ").unwrap();
    let mut it = line[at..].split_whitespace().skip(1);
    let run = it.next().unwrap().to_string();
    let sleeper: i32 = it.next().unwrap().parse().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();

    let ns = |run: &str| {
        let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with(&format!("zy-{run}-")))
            .count()
    };
    assert!(ns(&run) > 0, "the killed run left its namespaces behind");
    let reaped = zy_lab::reap_stale();
    assert!(reaped.contains(&run), "{reaped:?}");
    assert_eq!(ns(&run), 0);
    assert!(!zy_lab::lab_root().join(&run).exists());
    std::thread::sleep(Duration::from_millis(200));
    assert!(!zy_lab::pid_alive(sleeper), "the run's processes are gone");
}
