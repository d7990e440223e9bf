//! `--vmm libvirt` end to end, through the real binaries, real FUSE, a real
//! libvirt daemon and QEMU (TCG): `isrctl resume --vmm libvirt` defines a
//! transient domain from the parcel's `vm.toml` pointing into the lazy mount
//! (`virsh create`), `isrctl suspend` saves it into the mount (`virsh save`) and
//! checks in, and another machine (its own state, cache and daemon, the same
//! store) continues the same boot with `virsh restore`. Also: a domain destroyed
//! behind isr's back commits nothing and the session boots again.
//!
//! Needs `virsh` and a libvirt daemon answering on `qemu:///session` (as root:
//! the system `libvirtd`, running QEMU as root); `.ci/install-deps.sh` sets it up.
//! Without them these tests fail, saying how to install them.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use support::Env;
use support::guest::{self, GuestLine};
use support::vm::{
    assert_contiguous_one_boot, counters, serial_lines, serial_log, status, version_counter_log,
    vm_state,
};

/// Liveness guard for a boot under TCG (4–8 s here); not a timing assertion.
const BOOT_LIMIT: Duration = Duration::from_secs(300);
/// Liveness guard for counting to go on.
const RUN_LIMIT: Duration = Duration::from_secs(180);

/// The connection isrctl uses by default (`[vmm] libvirt_uri`).
const URI: &str = isr::vmm::libvirt::SESSION_URI;

const LIBVIRT_HINT: &str = "`bash .ci/install-deps.sh` installs and starts it. By hand, as root on \
     Debian 12: `apt-get install --no-install-recommends libvirt-daemon libvirt-clients \
     libvirt-daemon-driver-qemu`; `groupadd -r libvirt-qemu; useradd -r -g libvirt-qemu -d \
     /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu` (libvirt-daemon-system would create it); \
     /etc/libvirt/qemu.conf with `user = \"root\"`, `group = \"root\"` (QEMU must open files in \
     root's FUSE mount) and `stdio_handler = \"file\"` (no virtlogd); `mkdir -p /var/log/libvirt; \
     libvirtd --daemon`. As another user, `virsh` starts that user's session daemon itself";

/// Fails loudly unless `virsh` is installed and a libvirt daemon with the QEMU
/// driver answers on [`URI`].
fn require_libvirt() {
    Env::require_fuse();
    guest::qemu_binary();
    let virsh = support::find_program("virsh", LIBVIRT_HINT);
    let output = Command::new(virsh)
        .args(["--connect", URI, "version"])
        .output()
        .expect("run virsh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("Running hypervisor: QEMU"),
        "this test needs a libvirt daemon with the QEMU driver on {URI}, but `virsh --connect {URI} version` said ({}):\n{stdout}{}\n{LIBVIRT_HINT}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
    );
}

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["--connect", URI])
        .args(args)
        .output()
        .expect("run virsh")
}

/// Destroys the test's domain on drop, whatever happened (domain names are
/// global to the libvirt daemon).
struct DomainGuard(String);

impl Drop for DomainGuard {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.0]);
    }
}

/// A parcel (and so domain) name no other test run uses at the same time.
fn unique_name(tag: &str) -> String {
    format!("isr-{tag}-{}", std::process::id())
}

/// Builds the guest and imports it (kernel, initrd, disk, vm.toml) as `name`.
fn import_guest(env: &Env, name: &str) {
    require_libvirt();
    support::vm::import_guest(env, name, &support::vm::guest_vm_toml("libvirt", &[]));
}

/// Where libvirt keeps the domain's QEMU log: the system daemon's (root) or
/// the session daemon's (isrctl runs with HOME set to the environment).
fn libvirt_qemu_log(env: &Env, name: &str) -> String {
    [
        PathBuf::from(format!("/var/log/libvirt/qemu/{name}.log")),
        env.path(&format!(".cache/libvirt/qemu/log/{name}.log")),
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .unwrap_or_default()
}

/// Polls the serial console until `done` holds; panics with the console and
/// QEMU's log if the VM stops running first.
fn wait_for(
    env: &Env,
    name: &str,
    what: &str,
    limit: Duration,
    done: impl Fn(&[GuestLine]) -> bool,
) -> Vec<GuestLine> {
    let exited = || {
        let state = vm_state(env, name);
        (state != "running" && state != "busy").then_some(state)
    };
    let output = || {
        format!(
            "serial console:\n{}\nlibvirt's qemu log:\n{}\nvirsh list: {}",
            String::from_utf8_lossy(&std::fs::read(serial_log(env, name)).unwrap_or_default()),
            libvirt_qemu_log(env, name),
            String::from_utf8_lossy(&virsh(&["list", "--all"]).stdout)
        )
    };
    guest::poll_serial(&serial_log(env, name), what, limit, done, exited, output)
}

/// Waits until the console shows `more` counter lines beyond the `seen` first.
fn count_on(env: &Env, name: &str, seen: usize, more: usize) -> Vec<(u64, String)> {
    let lines = wait_for(env, name, "counter lines", RUN_LIMIT, |l| {
        counters(l).len() >= seen + more
    });
    counters(&lines)
}

/// `isrctl resume --vmm libvirt NAME --json`, checked: the domain runs, its
/// console is logged where the status says, and the step run was `virsh create`
/// (booted) or `virsh restore` (from the memory image).
fn resume(env: &Env, name: &str, from_memory: bool) -> serde_json::Value {
    let answer = env.json(&["resume", "--vmm", "libvirt", name]);
    let vm = &answer["vm"];
    assert_eq!(vm["state"], "running", "{answer}");
    assert_eq!(vm["kind"], "libvirt", "{answer}");
    assert_eq!(vm["resumed_from_memory"], from_memory, "{answer}");
    assert_eq!(
        vm["serial_log"].as_str().map(PathBuf::from),
        Some(serial_log(env, name)),
        "{answer}"
    );
    let step = vm["steps"][0].as_array().unwrap();
    let verb = if from_memory { "restore" } else { "create" };
    assert_eq!(step[0], "virsh", "{answer}");
    assert_eq!(step[3], verb, "{answer}");
    let mount = PathBuf::from(answer["mount"].as_str().unwrap());
    assert!(
        !mount.join("memory.img").exists(),
        "the memory image is consumed once the VM runs from it (or there was none)"
    );
    let domain_xml = std::fs::read_to_string(env.path(&format!("run/vm/{name}/domain.xml")))
        .expect("the domain XML is in the VM's runtime directory");
    assert!(
        domain_xml.contains(&format!(
            "<source file='{}'/>",
            mount.join("disk.img").display()
        )),
        "{domain_xml}"
    );
    let state = virsh(&["domstate", name]);
    assert_eq!(
        String::from_utf8_lossy(&state.stdout).trim(),
        "running",
        "libvirt runs the domain: {state:?}"
    );
    answer
}

/// `isrctl suspend NAME --json`, checked: memory saved, a version committed, the
/// transient domain gone.
fn suspend(env: &Env, name: &str) -> serde_json::Value {
    let answer = support::vm::suspend(env, name);
    assert!(
        !virsh(&["domstate", name]).status.success(),
        "a saved transient domain is gone"
    );
    answer
}

/// Stored chunks of `memory.img` in `new` that `old` does not have, and all of them.
fn new_memory_chunks(
    old: &isr::manifest::Manifest,
    new: &isr::manifest::Manifest,
) -> (usize, usize) {
    use isr::chunk::ChunkRef;
    let before: std::collections::HashSet<_> = old.stored_chunks().map(|(t, _)| t).collect();
    let (_, _, chunks) = new
        .files()
        .find(|(path, _, _)| *path == "memory.img")
        .expect("memory.img is in the version");
    let tags: std::collections::HashSet<_> = chunks
        .iter()
        .filter_map(|c| match c {
            ChunkRef::Stored { tag, .. } => Some(*tag),
            ChunkRef::Zero => None,
        })
        .collect();
    (
        tags.iter().filter(|t| !before.contains(t)).count(),
        tags.len(),
    )
}

#[test]
fn a_libvirt_vm_suspended_on_one_machine_continues_on_another() {
    let a = Env::local();
    let name = unique_name("ab");
    import_guest(&a, &name);
    let _domain = DomainGuard(name.clone());

    // Machine A boots it (no memory image yet) from the mount.
    let answer = resume(&a, &name, false);
    eprintln!(
        "A: `virsh create` returned {:.2} s after the request",
        answer["vm"]["start_seconds"].as_f64().unwrap()
    );
    let on_a = count_on(&a, &name, 0, 3);
    let boot = on_a[0].1.clone();
    let answer = suspend(&a, &name);
    eprintln!(
        "A: counted to {}, `virsh save` took {:.2} s: memory image {} bytes; checkin uploaded {} bytes in {:.2} s",
        on_a.last().unwrap().0,
        answer["saved"]["seconds"].as_f64().unwrap(),
        answer["saved"]["memory_bytes"],
        answer["checkin"]["uploaded_bytes"],
        answer["checkin"]["seconds"].as_f64().unwrap(),
    );
    let last_a = counters(&serial_lines(&a, &name)).last().unwrap().0;
    let v2 = support::vm::export(&a, &name, 2);
    let head = std::fs::read(v2.join("memory.img")).unwrap();
    assert!(
        isr::vmm::libvirt::is_saved_image(&head),
        "version 2's memory image is a libvirt save: {:?}",
        String::from_utf8_lossy(&head[..16.min(head.len())])
    );
    std::fs::remove_dir_all(&v2).unwrap();

    // Machine B: empty state and cache, the same store: `virsh restore`.
    let b = a.another_machine();
    let answer = resume(&b, &name, true);
    let fetched = status(&b, &name)["fetch"]["fetched_bytes"]
        .as_u64()
        .unwrap();
    eprintln!(
        "B (cold cache): `virsh restore` returned {:.2} s after the request, {fetched} bytes fetched by then",
        answer["vm"]["start_seconds"].as_f64().unwrap()
    );
    let on_b = count_on(&b, &name, 0, 3);
    assert_eq!(
        on_b[0],
        (last_a + 1, boot.clone()),
        "B continues A's boot where it stopped"
    );
    assert!(
        !serial_lines(&b, &name)
            .iter()
            .any(|l| matches!(l, GuestLine::Boot { .. })),
        "B resumed, it did not boot"
    );
    eprintln!("B: counter lines {on_b:?}");
    suspend(&b, &name);
    // `virsh save` (libvirt 9.0) writes QEMU's migration stream, not mapped-ram:
    // reported, not asserted.
    let (fresh, total) = new_memory_chunks(&a.manifest(&name, 2), &b.manifest(&name, 3));
    eprintln!(
        "B: suspended; memory image of version 3: {fresh} of its {total} stored chunks are not in version 2"
    );
    let last_b = counters(&serial_lines(&b, &name)).last().unwrap().0;

    // Back on A, whose cache holds version 2's chunks.
    let seen = counters(&serial_lines(&a, &name)).len();
    let answer = resume(&a, &name, true);
    let again = count_on(&a, &name, seen, 2);
    eprintln!(
        "A (warm cache): `virsh restore` returned {:.2} s after the request; counter lines {:?}",
        answer["vm"]["start_seconds"].as_f64().unwrap(),
        &again[seen..]
    );
    assert_eq!(again[seen], (last_b + 1, boot.clone()));
    suspend(&a, &name);
    assert_eq!(a.versions(&name), [1, 2, 3, 4]);
    assert_contiguous_one_boot(&version_counter_log(&a, &name, 4), &boot);
    a.ok(&["verify", &name]);
}

#[test]
fn a_destroyed_domain_commits_nothing_and_the_session_boots_again() {
    let env = Env::local();
    let name = unique_name("gone");
    import_guest(&env, &name);
    let _domain = DomainGuard(name.clone());
    resume(&env, &name, false);
    count_on(&env, &name, 0, 2);
    suspend(&env, &name);

    // Restored from memory; then the domain is destroyed behind isr's back.
    resume(&env, &name, true);
    let seen = counters(&serial_lines(&env, &name)).len();
    let before = count_on(&env, &name, seen, 2);
    let boot = before.last().unwrap().1.clone();
    let destroyed = virsh(&["destroy", &name]);
    assert!(destroyed.status.success(), "{destroyed:?}");
    // isrfsd asks libvirt (`virsh domstate`) when asked for the status.
    let deadline = std::time::Instant::now() + RUN_LIMIT;
    while vm_state(&env, &name) != "exited" {
        assert!(
            std::time::Instant::now() < deadline,
            "isrfsd does not see the domain gone"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let vm = &status(&env, &name)["vm"];
    assert!(vm["exit"].as_str().unwrap().contains("gone"), "{vm}");

    let stderr = env.fails(&["suspend", &name], 1);
    assert!(stderr.contains("not running"), "{stderr}");
    assert!(stderr.contains("nothing was committed"), "{stderr}");
    assert_eq!(env.versions(&name), [1, 2], "nothing committed");

    // The session is still there: resume boots the VM from its disk.
    let answer = resume(&env, &name, false);
    assert_eq!(answer["reattached"], true);
    let seen = serial_lines(&env, &name).len();
    let lines = wait_for(&env, &name, "a new boot counting", BOOT_LIMIT, |l| {
        guest::counting(&l[seen..], 2).is_some()
    });
    let (new_boot, ns) = guest::counting(&lines[seen..], 2).unwrap();
    assert_ne!(
        new_boot, boot,
        "a fresh boot after the domain was destroyed"
    );
    assert!(
        ns[0] > before.last().unwrap().0,
        "the counter goes on from the disk's log: {ns:?} after {before:?}"
    );
    suspend(&env, &name);
    assert_eq!(env.versions(&name), [1, 2, 3]);
}
