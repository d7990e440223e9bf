//! The virtual machine side of a parcel: how the VM in a parcel is described
//! ([`config`], the parcel's `vm.toml`), and later the adapters that run it
//! (QEMU over QMP, libvirt, VirtualBox, or none).

pub mod config;
