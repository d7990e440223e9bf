mod support;
use support::Env;
use support::vm::{count_on, resume, status, suspend};

#[test]
fn experiment_readaround() {
    let a = Env::local();
    let name = "exp";
    let extra = std::env::var("EXP_TOML").unwrap_or_default();
    let vm_toml = format!(
        "{extra}{}",
        support::vm::guest_vm_toml("qemu", &["-no-reboot".to_owned()])
    );
    support::vm::import_guest(&a, name, &vm_toml);
    resume(&a, name);
    count_on(&a, name, 0, 3);
    suspend(&a, name);
    let b = a.another_machine();
    b.append_config("\n[fetch]\nprefetch = false\n");
    let answer = resume(&b, name);
    let at_run = status(&b, name)["fetch"]["fetched_bytes"].as_u64().unwrap();
    count_on(&b, name, 0, 1);
    let s = status(&b, name);
    let at_first = s["fetch"]["fetched_bytes"].as_u64().unwrap();
    count_on(&b, name, 0, 3);
    let at_third = status(&b, name)["fetch"]["fetched_bytes"].as_u64().unwrap();
    let mount = std::path::PathBuf::from(answer["mount"].as_str().unwrap());
    let maps = std::fs::read_to_string(mount.join(".isr/chunks")).unwrap();
    for line in maps.lines() {
        let (path, map) = line.split_once(": ").unwrap();
        let local = map.chars().filter(|c| *c == 'L').count();
        eprintln!("{path}: {local} local chunks of {}", map.len());
    }
    eprintln!(
        "EXP start {:.2}s fetched at running {at_run}, at first progress {at_first}, at third {at_third}",
        answer["vm"]["start_seconds"].as_f64().unwrap()
    );
    b.ok(&["discard", name]);
}
