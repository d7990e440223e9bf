//! The virtual machine side of a parcel: how the VM in a parcel is described
//! ([`config`], the parcel's `vm.toml`), and the adapters that run it:
//! [`qemu`] (QEMU driven over QMP: command line, suspend to and resume from a
//! memory image); later libvirt, VirtualBox, or none.

pub mod config;
pub mod qemu;
