//! The FUSE edge: a thin `fuser::Filesystem` over [`isr::image::Image`].
//! Inode numbers are the image's stable node ids (root = [`ROOT`]), passed
//! to the image as they come: an operation on an open file names its node,
//! a directory entry is (parent node, name); no request resolves a path.
//! Every [`ImageError`] becomes an errno here and nowhere else.
//!
//! A read-only virtual directory `.isr/` at the root shows the session:
//! `.isr/stats` (the same JSON as `isrctl status --json`) and `.isr/chunks`
//! (per file, one character per chunk: `.` zero, `L` local, `R` remote, `D`
//! changed, `U` changed and waiting for upload). Each open generates its
//! content once (direct I/O, size 0), so a reader sees one moment however
//! it splits its reads; the content is dropped when the file is closed.
//!
//! Files are opened with `FOPEN_KEEP_CACHE`: every change to a file passes
//! through this mount, so the kernel's cached pages of it stay right across
//! opens. It also means an open never invalidates pages, which would wait
//! (unkillably) for a read that waits for the store.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use isr::image::{Image, ImageError, Node, NodeKind, ROOT};
use isr::manifest::Timestamp;
use isr::session::StatusSource;

/// Inode of the virtual `.isr` directory (image ids count up from 2).
const ISR_DIR: u64 = u64::MAX - 1;
const STATS_FILE: u64 = u64::MAX - 2;
const CHUNKS_FILE: u64 = u64::MAX - 3;
const ISR_DIR_NAME: &str = ".isr";

const TTL: Duration = Duration::from_secs(1);
const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;

/// The errno for an image error (the only mapping in the daemon).
pub fn errno(error: &ImageError) -> Errno {
    match error {
        ImageError::NotFound(_) => Errno::ENOENT,
        ImageError::Exists(_) => Errno::EEXIST,
        ImageError::NotDirectory(_) => Errno::ENOTDIR,
        ImageError::IsDirectory(_) => Errno::EISDIR,
        ImageError::NotEmpty(_) => Errno::ENOTEMPTY,
        ImageError::Invalid(_) => Errno::EINVAL,
        ImageError::Frozen => Errno::EROFS,
        ImageError::Fetch(_)
        | ImageError::Base(_)
        | ImageError::OpenState { .. }
        | ImageError::State(_)
        | ImageError::CorruptState(_)
        | ImageError::Cache(_)
        | ImageError::Encoder(_)
        | ImageError::Poisoned => Errno::EIO,
    }
}

/// One mounted parcel.
pub struct ParcelFs {
    image: Arc<Image>,
    status: StatusSource,
    uid: u32,
    gid: u32,
    io_errors: AtomicU64,
    /// The content of each open `.isr` file, by its file handle.
    virtual_open: Mutex<HashMap<u64, Arc<[u8]>>>,
    next_handle: AtomicU64,
}

impl ParcelFs {
    /// A file system serving `image`, owned by `uid`:`gid`.
    pub fn new(image: Arc<Image>, status: StatusSource, uid: u32, gid: u32) -> ParcelFs {
        ParcelFs {
            image,
            status,
            uid,
            gid,
            io_errors: AtomicU64::new(0),
            virtual_open: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
        }
    }

    fn attr(&self, node: &Node) -> FileAttr {
        let mtime = node.mtime.to_system_time();
        FileAttr {
            ino: INodeNo(node.id),
            size: node.size,
            blocks: node.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind: match node.kind {
                NodeKind::Directory => FileType::Directory,
                NodeKind::File => FileType::RegularFile,
            },
            perm: node.mode as u16,
            nlink: if node.kind == NodeKind::Directory {
                2
            } else {
                1
            },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 128 * 1024,
            flags: 0,
        }
    }

    fn virtual_attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm) = match ino {
            ISR_DIR => (NodeKind::Directory, 0o555),
            STATS_FILE | CHUNKS_FILE => (NodeKind::File, 0o444),
            _ => return None,
        };
        let mut attr = self.attr(&self.image.node(ROOT).expect("root exists"));
        attr.ino = INodeNo(ino);
        attr.perm = perm;
        if kind == NodeKind::File {
            attr.kind = FileType::RegularFile;
            attr.nlink = 1;
        }
        Some(attr)
    }

    fn virtual_content(&self, ino: u64) -> Vec<u8> {
        match ino {
            STATS_FILE => {
                let mut json = serde_json::to_vec_pretty(&self.status.status()).unwrap_or_default();
                json.push(b'\n');
                json
            }
            _ => self.status.chunk_maps().into_bytes(),
        }
    }

    fn fail(&self, error: &ImageError) -> Errno {
        let errno = errno(error);
        if errno == Errno::EIO {
            // A guest can trigger these at high rate: count always, log sparsely.
            let count = self.io_errors.fetch_add(1, Ordering::Relaxed) + 1;
            if count.is_power_of_two() {
                tracing::warn!(%error, count, "I/O error returned to a reader or writer");
            }
        }
        errno
    }

    /// The image node of `ino`: every inode but the virtual ones of `.isr`.
    fn id(&self, ino: INodeNo) -> Result<u64, Errno> {
        if self.virtual_attr(ino.0).is_some() {
            return Err(Errno::EACCES); // nothing can be created or changed in .isr
        }
        Ok(ino.0)
    }

    /// The entry `name` of directory `parent`, as the image names it.
    fn child<'a>(&self, parent: INodeNo, name: &'a OsStr) -> Result<(u64, &'a str), Errno> {
        let parent = self.id(parent)?;
        Ok((parent, name.to_str().ok_or(Errno::EINVAL)?))
    }

    fn sync_file(&self, ino: INodeNo) -> Result<(), Errno> {
        if self.virtual_attr(ino.0).is_some() {
            return Ok(()); // nothing to sync in .isr (closing its files must not fail)
        }
        self.image.fsync(ino.0).map_err(|e| self.fail(&e))
    }

    fn node(&self, ino: INodeNo) -> Result<Node, Errno> {
        let id = self.id(ino)?;
        self.image.node(id).map_err(|e| self.fail(&e))
    }
}

/// Replies to a request that returns no data.
fn answer(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn time(value: TimeOrNow) -> Timestamp {
    match value {
        TimeOrNow::SpecificTime(t) => Timestamp::from(t),
        TimeOrNow::Now => Timestamp::from(SystemTime::now()),
    }
}

/// Readahead for a mount, in KiB: the kernel keeps this many bytes of
/// sequential reads in flight (as read requests of up to 1 MiB, `max_pages`).
/// Every warm read request waits for a chunk file of the cache and its
/// decryption, so requests in flight are what keeps both cores and the disk
/// busy: a 1 GiB sequential read went from 400 to 770 MB/s with 4 MiB
/// instead of the kernel's 128 KiB (docs/performance.md).
pub const READAHEAD_KIB: u32 = 4096;

/// How much of the machine's dirty-page limit one mount may hold, percent
/// (the BDI's `max_ratio`). The kernel gives a FUSE mount 1 % (and a strict
/// limit), so a guest whose RAM is a file on the mount (lazy memory) writing
/// memory fast would be held to the daemon's write speed after a few tens of
/// MB; the daemon is this machine's own and flushes by itself.
pub const DIRTY_RATIO_PERCENT: u32 = 40;

/// Tunes the mount's BDI in sysfs, which needs root (otherwise the kernel's
/// defaults stay and this says so at debug level): readahead to
/// [`READAHEAD_KIB`] (the kernel takes the smaller of its default, 128 KiB, and
/// what INIT asks for, so it can only be raised here), and the share of dirty
/// pages to [`DIRTY_RATIO_PERCENT`].
pub fn tune_bdi(mount: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    // The stat waits for FUSE INIT, which would otherwise lower the readahead again.
    let dev = match std::fs::metadata(mount) {
        Ok(meta) => meta.dev(),
        Err(e) => {
            tracing::debug!(mount = %mount.display(), error = %e, "BDI left as is");
            return;
        }
    };
    let bdi = format!(
        "/sys/class/bdi/{}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    for (knob, value) in [
        ("read_ahead_kb", READAHEAD_KIB),
        ("max_ratio", DIRTY_RATIO_PERCENT),
    ] {
        let path = format!("{bdi}/{knob}");
        if let Err(e) = std::fs::write(&path, value.to_string()) {
            tracing::debug!(%path, error = %e, "left at the kernel's default");
        }
    }
}

impl Filesystem for ParcelFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(READAHEAD_KIB << 10);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let virtual_ino = match (parent.0, name.to_str()) {
            (1, Some(ISR_DIR_NAME)) => Some(ISR_DIR),
            (ISR_DIR, Some("stats")) => Some(STATS_FILE),
            (ISR_DIR, Some("chunks")) => Some(CHUNKS_FILE),
            (ISR_DIR, _) => return reply.error(Errno::ENOENT),
            _ => None,
        };
        if let Some(attr) = virtual_ino.and_then(|ino| self.virtual_attr(ino)) {
            return reply.entry(&TTL, &attr, Generation(0));
        }
        match self
            .child(parent, name)
            .and_then(|(parent, name)| self.image.lookup(parent, name).map_err(|e| self.fail(&e)))
        {
            Ok(node) => reply.entry(&TTL, &self.attr(&node), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if let Some(attr) = self.virtual_attr(ino.0) {
            return reply.attr(&TTL, &attr);
        }
        match self.node(ino) {
            Ok(node) => reply.attr(&TTL, &self.attr(&node)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = (|| {
            let id = self.id(ino)?;
            if let Some(size) = size {
                self.image.truncate(id, size).map_err(|e| self.fail(&e))?;
            }
            if mode.is_some() || mtime.is_some() {
                self.image
                    .set_attributes(id, mode, mtime.map(time))
                    .map_err(|e| self.fail(&e))?;
            }
            self.node(ino)
        })();
        match result {
            Ok(node) => reply.attr(&TTL, &self.attr(&node)),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut entries: Vec<(INodeNo, FileType, String)> = vec![
            (ino, FileType::Directory, ".".to_owned()),
            (ino, FileType::Directory, "..".to_owned()),
        ];
        if ino.0 == ISR_DIR {
            entries.push((INodeNo(STATS_FILE), FileType::RegularFile, "stats".into()));
            entries.push((INodeNo(CHUNKS_FILE), FileType::RegularFile, "chunks".into()));
        } else {
            let listing = self
                .id(ino)
                .and_then(|id| self.image.list(id).map_err(|e| self.fail(&e)));
            match listing {
                Ok(listing) => entries.extend(listing.into_iter().map(|(name, node)| {
                    let kind = if node.kind == NodeKind::Directory {
                        FileType::Directory
                    } else {
                        FileType::RegularFile
                    };
                    (INodeNo(node.id), kind, name)
                })),
                Err(e) => return reply.error(e),
            }
            if ino.0 == ROOT {
                entries.push((INodeNo(ISR_DIR), FileType::Directory, ISR_DIR_NAME.into()));
            }
        }
        let all = entries.into_iter();
        for (index, (ino, kind, name)) in all.enumerate().skip(offset as usize) {
            if reply.add(ino, index as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if matches!(ino.0, STATS_FILE | CHUNKS_FILE) {
            let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
            let content = self.virtual_content(ino.0).into();
            self.virtual_open
                .lock()
                .expect("virtual files lock")
                .insert(handle, content);
            return reply.opened(FileHandle(handle), FopenFlags::FOPEN_DIRECT_IO);
        }
        match self.node(ino) {
            Ok(node) if node.kind == NodeKind::File => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Ok(_) => reply.error(Errno::EISDIR),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if matches!(ino.0, STATS_FILE | CHUNKS_FILE) {
            let opened = self
                .virtual_open
                .lock()
                .expect("virtual files lock")
                .get(&fh.0)
                .cloned();
            let Some(content) = opened else {
                return reply.error(Errno::EBADF); // (every read follows an open)
            };
            let start = (offset as usize).min(content.len());
            let end = (start + size as usize).min(content.len());
            return reply.data(&content[start..end]);
        }
        match self.id(ino).and_then(|id| {
            self.image
                .read(id, offset, size as usize)
                .map_err(|e| self.fail(&e))
        }) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.id(ino).and_then(|id| {
            self.image
                .write(id, offset, data)
                .map_err(|e| self.fail(&e))
        }) {
            Ok(written) => reply.written(written as u32),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if matches!(ino.0, STATS_FILE | CHUNKS_FILE) {
            self.virtual_open
                .lock()
                .expect("virtual files lock")
                .remove(&fh.0);
        }
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Closing a file makes it durable, like fsync.
        answer(reply, self.sync_file(ino));
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        answer(reply, self.sync_file(ino));
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self.child(parent, name).and_then(|(parent, name)| {
            self.image
                .create_file(parent, name, mode & !umask)
                .map_err(|e| self.fail(&e))
        }) {
            Ok(node) => reply.created(
                &TTL,
                &self.attr(&node),
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        match self.child(parent, name).and_then(|(parent, name)| {
            self.image
                .mkdir(parent, name, mode & !umask)
                .map_err(|e| self.fail(&e))
        }) {
            Ok(node) => reply.entry(&TTL, &self.attr(&node), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer(
            reply,
            self.child(parent, name).and_then(|(parent, name)| {
                self.image.unlink(parent, name).map_err(|e| self.fail(&e))
            }),
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer(
            reply,
            self.child(parent, name).and_then(|(parent, name)| {
                self.image.rmdir(parent, name).map_err(|e| self.fail(&e))
            }),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = self.child(parent, name).and_then(|(parent, name)| {
            let (newparent, newname) = self.child(newparent, newname)?;
            self.image
                .rename(parent, name, newparent, newname)
                .map_err(|e| self.fail(&e))
        });
        answer(reply, result);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Capacity is the local cache's business; report a large, honest-enough free space.
        let blocks = 1u64 << 32;
        reply.statfs(
            blocks,
            blocks / 2,
            blocks / 2,
            1 << 20,
            1 << 19,
            4096,
            255,
            4096,
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let result = self.id(ino).and_then(|id| {
            if mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE {
                self.image
                    .punch_hole(id, offset, length)
                    .map_err(|e| self.fail(&e))
            } else if mode == 0 {
                let node = self.node(ino)?;
                if offset + length > node.size {
                    self.image
                        .truncate(id, offset + length)
                        .map_err(|e| self.fail(&e))?;
                }
                Ok(())
            } else {
                Err(Errno::EOPNOTSUPP)
            }
        });
        answer(reply, result);
    }
}
