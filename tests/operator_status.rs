//! What an operator sees of this machine's sessions (issue 15, defects 5
//! and 6), with real isrfsd daemons and FUSE mounts: `isrctl status` lists
//! the sessions on disk while isrfsd is down, and `isrctl resume` refuses
//! arguments that contradict the session it would reattach.

mod support;

use std::path::PathBuf;

use support::Env;

fn resume(env: &Env, target: &str) -> PathBuf {
    let value = env.json(&["resume", target]);
    PathBuf::from(value["mount"].as_str().unwrap())
}

/// Defect 5: with isrfsd down (killed, or stopped by SIGTERM), `status`
/// says which sessions wait on disk and how to reattach them.
fn status_lists_sessions_while_the_daemon_is_down(signal: nix::sys::signal::Signal) {
    Env::require_fuse();
    let env = Env::local();
    env.import_files("vm", &[("disk.img", support::random_bytes("vm", 1 << 20))]);
    let mount = resume(&env, "vm");
    std::fs::write(mount.join("note"), b"written before the daemon went").unwrap();
    let pid = env.daemon_pid().expect("isrfsd runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
    support::wait_for_exit(pid);
    env.stop_daemon(); // detaches what a killed daemon left mounted

    let text = env.ok(&["status"]);
    assert!(!text.contains("no resumed parcels"), "{text}");
    assert!(text.contains("vm"), "{text}");
    assert!(
        text.contains("daemon not running — `isrctl resume vm` reattaches"),
        "{text}"
    );
    let json = env.json(&["status"]);
    assert_eq!(json["schema"], 1, "{json}");
    assert_eq!(json["daemon_running"], false, "{json}");
    let sessions = json["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{json}");
    assert_eq!(sessions[0]["attached"], false, "{json}");
    assert_eq!(sessions[0]["parcel"], "vm", "{json}");
    assert_eq!(sessions[0]["base_version"], 1, "{json}");
    assert!(
        sessions[0]["hint"]
            .as_str()
            .unwrap()
            .contains("isrctl resume vm"),
        "{json}"
    );
    // Asking for that parcel finds it too; another is not resumed.
    assert_eq!(
        env.json(&["status", "vm"])["sessions"][0]["attached"],
        false
    );
    env.fails(&["status", "other"], 4);

    // As the line says: resume reattaches, with the write intact.
    let mount = resume(&env, "vm");
    assert_eq!(
        std::fs::read(mount.join("note")).unwrap(),
        b"written before the daemon went"
    );
    let json = env.json(&["status"]);
    assert_eq!(json["daemon_running"], true, "{json}");
    assert_eq!(json["sessions"][0]["attached"], true, "{json}");
    assert_eq!(json["sessions"].as_array().unwrap().len(), 1, "{json}");
    env.ok(&["checkin", "vm"]);
    assert_eq!(env.json(&["status"])["sessions"], serde_json::json!([]));
}

#[test]
fn status_lists_sessions_after_isrfsd_is_killed() {
    status_lists_sessions_while_the_daemon_is_down(nix::sys::signal::Signal::SIGKILL);
}

#[test]
fn status_lists_sessions_after_isrfsd_is_terminated() {
    status_lists_sessions_while_the_daemon_is_down(nix::sys::signal::Signal::SIGTERM);
}

/// Defect 6: `resume NAME@V` or `--mount DIR` for a parcel resumed here
/// from another version or at another mount is refused (exit 5) naming
/// what is resumed, whether isrfsd runs or not; plain `resume NAME`
/// reattaches.
#[test]
fn resume_refuses_a_version_or_mount_other_than_the_resumed_one() {
    Env::require_fuse();
    let env = Env::local();
    let source = env.import_files("vm", &[("a.txt", b"one")]);
    std::fs::write(source.join("a.txt"), b"two").unwrap();
    env.ok(&["import", "--new-version", "vm", source.to_str().unwrap()]);
    let mount = resume(&env, "vm@1");
    assert_eq!(std::fs::read(mount.join("a.txt")).unwrap(), b"one");

    let other = env.path("elsewhere");
    std::fs::create_dir_all(&other).unwrap();
    for daemon_running in [true, false] {
        let refused = env.fails(&["resume", "vm@2"], 5);
        assert!(refused.contains("version 1"), "{refused}");
        assert!(refused.contains("version 2 was asked for"), "{refused}");
        assert!(refused.contains(&mount.display().to_string()), "{refused}");
        let refused = env.fails(&["resume", "--mount", other.to_str().unwrap(), "vm"], 5);
        assert!(
            refused.contains(&format!("--mount {} was asked for", other.display())),
            "{refused}"
        );
        assert!(refused.contains(&mount.display().to_string()), "{refused}");
        if daemon_running {
            // The session is untouched: still version 1, at its mount.
            assert_eq!(std::fs::read(mount.join("a.txt")).unwrap(), b"one");
        }
        // The same holds while isrfsd is down: the session record says it.
        env.kill_daemon();
        env.stop_daemon();
    }
    // What agrees with the session reattaches it.
    let again = env.json(&["resume", "vm@1"]);
    assert_eq!(again["reattached"], true, "{again}");
    assert_eq!(again["mount"], mount.display().to_string());
    let again = env.json(&["resume", "--mount", mount.to_str().unwrap(), "vm"]);
    assert_eq!(again["reattached"], true, "{again}");
    assert_eq!(std::fs::read(mount.join("a.txt")).unwrap(), b"one");
    let status = env.json(&["status", "vm"]);
    assert_eq!(status["sessions"][0]["base_version"], 1);
    env.ok(&["discard", "vm"]);
    // Nothing resumed: any version resumes.
    let mount = resume(&env, "vm@2");
    assert_eq!(std::fs::read(mount.join("a.txt")).unwrap(), b"two");
    env.ok(&["discard", "vm"]);
}
