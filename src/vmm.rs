//! The virtual machine side of a parcel: how the VM in a parcel is described
//! ([`config`], the parcel's `vm.toml`), and the adapters that run it
//! (QEMU over QMP, libvirt, VirtualBox, or none):
//!
//! - [`qemu`]: QEMU driven over QMP: command line from `vm.toml`, suspend to
//!   and resume from a memory image (`file:` + mapped-ram on QEMU ≥ 9,
//!   `exec:cat` before).
//! - [`libvirt`]: domain XML for `virsh create` and the `virsh` steps to resume
//!   (create or restore) and suspend (save) it.
//! - [`virtualbox`]: VMDK descriptors over the parcel's raw disks and the
//!   `VBoxManage` steps to register, start, save and unregister the VM.
//! - [`supervise`]: one parcel's VM as isrfsd runs it from the mount, with any
//!   of the adapters: start (boot, or resume from the memory image, which is
//!   then consumed), status, suspend into the mount, kill.

pub mod config;
pub mod libvirt;
pub mod qemu;
pub mod supervise;
pub mod virtualbox;
