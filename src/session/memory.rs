//! Lazy memory in a session: the one-unit rule for the RAM file and its
//! device state, and the working set.
//!
//! **One unit.** In lazy mode (see [`crate::vmm::config::MemoryMode`]) the
//! guest's RAM is a file of the parcel that changes in place while the guest
//! runs, and a resume consumes the device state. A RAM file without its
//! device state is the memory of a running (or crashed) guest: it must never be
//! paired with another device state, and it is worth nothing to the next resume,
//! which boots. So a version holds both or neither: [`unpaired_memory`] names
//! what a commit leaves out, and the trickle uploader leaves it alone too. The
//! adapter makes the RAM file durable before it puts the device state in place
//! (`vmm::qemu::save_device_state`), so a device state present is always
//! paired with the RAM file it was saved with.
//!
//! **Working set.** From the moment a VM runs on a RAM file, the image records
//! for [`WORKING_SET_WINDOW`] which of the RAM file's stored chunks the guest
//! reads first ([`crate::image::Image::record_working_set`]). A commit that
//! holds the RAM file stores those chunk indexes, as the new version's chunks
//! at those indexes (`versions/N.wset`, sealed like an access trace); the next
//! resume fetches them at [`crate::fetch::Priority::WorkingSet`] before
//! anything but demand reads and boot files.

use std::time::Duration;

use crate::chunk::ChunkTag;
use crate::image::{Image, NodeKind};
use crate::manifest::Manifest;
use crate::vmm::config::{VM_CONFIG_FILE, VmConfig, normalise};

/// How long after a VM starts its first reads of RAM count as its working set.
pub const WORKING_SET_WINDOW: Duration = Duration::from_secs(10);

/// The parcel's `vm.toml` as the image holds it now, if it has a valid one.
pub fn image_vm_config(image: &Image) -> Option<VmConfig> {
    let node = image.resolve(VM_CONFIG_FILE).ok()?;
    if node.kind != NodeKind::File {
        return None;
    }
    let text = image.read(node.id, 0, node.size as usize).ok()?;
    VmConfig::parse(std::str::from_utf8(&text).ok()?).ok()
}

/// The lazy-memory files of `config` that `present` has without their
/// partner: the RAM file without a device state, or a device state without a
/// RAM file (paths relative to the parcel's root).
pub fn unpaired_memory(config: &VmConfig, present: impl Fn(&str) -> bool) -> Vec<String> {
    let text = |path: &std::path::Path| normalise(path).to_string_lossy().into_owned();
    let (ram, state) = (text(&config.ram_file), text(&config.device_state));
    match (present(&ram), present(&state)) {
        (true, false) => vec![ram],
        (false, true) => vec![state],
        _ => Vec::new(),
    }
}

/// Removes from `manifest` the lazy-memory files that have no partner in it
/// ([`unpaired_memory`]) and returns their paths.
pub fn leave_out_unpaired(manifest: &mut Manifest, config: Option<&VmConfig>) -> Vec<String> {
    let Some(config) = config else {
        return Vec::new();
    };
    let left_out = unpaired_memory(config, |path| {
        manifest.files().any(|(file, _, _)| file == path)
    });
    manifest
        .entries
        .retain(|entry| !left_out.contains(&entry.path));
    left_out
}

/// Node ids of the image's unpaired lazy-memory files (for the trickle uploader).
pub fn unpaired_nodes(image: &Image) -> Vec<u64> {
    let Some(config) = image_vm_config(image) else {
        return Vec::new();
    };
    let node_of = |path: &str| image.resolve(path).ok().map(|node| node.id);
    unpaired_memory(&config, |path| node_of(path).is_some())
        .iter()
        .filter_map(|path| node_of(path))
        .collect()
}

/// The working set the image recorded, as the chunks of `manifest` at the
/// recorded indexes of the same file, in order (zero chunks skipped).
pub fn working_set_tags(image: &Image, manifest: &Manifest) -> Vec<ChunkTag> {
    let Some((node, indexes)) = image.working_set() else {
        return Vec::new();
    };
    let Some((path, _)) = image.files().into_iter().find(|(_, n)| n.id == node) else {
        return Vec::new();
    };
    let Some((_, _, chunks)) = manifest.files().find(|(file, _, _)| *file == path) else {
        return Vec::new();
    };
    indexes
        .iter()
        .filter_map(|&index| chunks.get(index as usize).and_then(|c| c.tag()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> VmConfig {
        VmConfig::parse(&format!(
            "vmm = \"qemu\"\nmemory = 256\n{extra}[[disk]]\nfile = \"disk.img\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_ram_file_goes_only_with_its_device_state() {
        let lazy = config("");
        let with = |files: &'static [&'static str]| move |p: &str| files.contains(&p);
        assert_eq!(
            unpaired_memory(&lazy, with(&["disk.img", "memory.ram"])),
            ["memory.ram"]
        );
        assert_eq!(
            unpaired_memory(&lazy, with(&["disk.img", "state.mig"])),
            ["state.mig"]
        );
        assert!(unpaired_memory(&lazy, with(&["memory.ram", "state.mig"])).is_empty());
        assert!(unpaired_memory(&lazy, with(&["disk.img", "memory.img"])).is_empty());
        let named = config("ram_file = \"./vm/ram\"\ndevice_state = \"vm/dev\"\n");
        assert_eq!(unpaired_memory(&named, with(&["vm/ram"])), ["vm/ram"]);
    }
}
