//! The daemon's life: `isrctl daemon status|stop`, the idle exit of the
//! isrfsd that isrctl starts, and no daemon left behind by a refused resume.

mod support;

use support::{Env, wait_for_exit};

#[test]
fn daemon_stop_saves_sessions_and_they_stay_resumable() {
    Env::require_fuse();
    let env = Env::local();
    env.import_files("vm", &[("disk.img", vec![3u8; 8192])]);
    let mount = env.json(&["resume", "--vmm", "none", "vm"])["mount"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::write(format!("{mount}/disk.img"), vec![4u8; 8192]).unwrap();
    let status = env.json(&["daemon", "status"]);
    assert_eq!(status["running"], true, "{status}");
    assert_eq!(status["sessions"], serde_json::json!(["vm"]), "{status}");
    let pid = status["pid"].as_i64().unwrap() as i32;
    assert!(
        status["log_dir"].as_str().unwrap().ends_with("/run/log"),
        "{status}"
    );

    env.ok(&["daemon", "stop"]);
    assert!(wait_for_exit(pid));
    assert_eq!(env.json(&["daemon", "status"])["running"], false);
    // The session was flushed and stays: a checkin commits the write.
    env.ok(&["checkin", "vm"]);
    assert_eq!(env.versions("vm"), vec![1, 2]);
    let tree = env.path("check");
    env.ok(&["export", "vm", tree.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(tree.join("disk.img")).unwrap(),
        vec![4u8; 8192]
    );
}

#[test]
fn the_daemon_isrctl_started_exits_after_the_last_session() {
    Env::require_fuse();
    let env = Env::local();
    env.import_files("vm", &[("disk.img", vec![3u8; 8192])]);
    env.ok(&["resume", "--vmm", "none", "vm"]);
    let pid = env.daemon_pid().unwrap();
    env.ok(&["checkin", "vm"]);
    // 30 s idle timeout: wait_for_exit waits 10 s at a time.
    let exited = (0..6).any(|_| wait_for_exit(pid));
    assert!(exited, "isrfsd {pid} still runs with no session");
    assert_eq!(env.json(&["daemon", "status"])["running"], false);
}

#[test]
fn a_refused_resume_leaves_no_daemon() {
    Env::require_fuse();
    let env = Env::local();
    env.import_files("vm", &[("disk.img", vec![3u8; 8192])]);
    let output = env
        .isrctl()
        .env("ISR_PASSPHRASE", "wrong passphrase")
        .args(["resume", "--vmm", "none", "vm"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    let pid = env.daemon_pid();
    assert!(
        pid.is_none_or(wait_for_exit),
        "an isrfsd ({pid:?}) was left running"
    );
}
