//! TAP devices: the thin I/O layer between the kernel and the switch.
//!
//! A pod port is a TAP device opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR and made
//! non-blocking. With the virtio-net header on, and TUNSETOFFLOAD telling the kernel that we take
//! partial checksums and TSO, one read returns a whole TCP super-frame (up to 64 KiB) with the
//! header describing what is left to do; that is what lets a userspace switch move bytes at
//! kernel speed. The device is created in the calling thread's network namespace (the namespace
//! is fixed when /dev/net/tun is opened), so callers run [`Tap::create`] inside the pod's
//! namespace and the file descriptor keeps working after they leave it.
//!
//! Devices are multi-queue (IFF_MULTI_QUEUE): each datapath worker reads its own queue, and the
//! kernel spreads a pod's flows over the queues, keeping each flow on the queue the switch last
//! wrote that flow's packets to (tun's automatic flow steering), so both directions of a flow
//! tend to meet in one worker. A device made by an older switch without the flag is taken back
//! with its single queue.
//!
//! All `unsafe` of the datapath lives here; every block says why it is sound.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Size of `struct virtio_net_hdr`, which the kernel puts before every frame (TUNSETVNETHDRSZ
/// default; we set it explicitly).
pub const VNET_HDR_LEN: usize = 10;

/// A TAP device handle. Dropping it closes the queue; for a non-persistent device the kernel
/// then deletes the interface, which is how a port is removed (and how a failed ADD is undone).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    offload: bool,
    /// UDP segmentation offload is on: UDP super-frames (GSO_UDP_L4) go both ways.
    uso: bool,
    /// Further queues of the same device, opened by [`Tap::add_queues`].
    extra: Vec<Tap>,
    multi_queue: bool,
}

#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Creates TAP device `name` in the calling thread's network namespace.
    ///
    /// Fails with `AlreadyExists` if an interface of that name exists (a TUNSETIFF on an existing
    /// persistent TAP would silently attach to it instead).
    pub fn create(name: &str, offload: bool) -> io::Result<Tap> {
        Tap::open(name, offload, true, true)
    }

    /// Opens a queue of the existing (persistent) TAP device `name` in the calling thread's
    /// network namespace: how a restarted switch takes its pods' ports back.
    pub fn attach(name: &str, offload: bool) -> io::Result<Tap> {
        if !interface_exists(name) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no interface named {name} in the namespace"),
            ));
        }
        match Tap::open(name, offload, false, true) {
            // A device created without IFF_MULTI_QUEUE refuses a multi-queue attach.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                Tap::open(name, offload, false, false)
            }
            r => r,
        }
    }

    /// Opens queues of this device until it has `total` (or the device is single-queue). Like
    /// [`Tap::create`], it must run in the device's network namespace.
    pub fn add_queues(&mut self, total: usize) -> io::Result<()> {
        while self.multi_queue && 1 + self.extra.len() < total {
            let q = Tap::open(&self.name, self.offload, false, true)?;
            self.extra.push(q);
        }
        Ok(())
    }

    /// The device's queues, this handle's own first.
    pub fn into_queues(mut self) -> Vec<Tap> {
        let mut extra = std::mem::take(&mut self.extra);
        extra.insert(0, self);
        extra
    }

    fn open(name: &str, offload: bool, exclusive: bool, multi_queue: bool) -> io::Result<Tap> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a valid interface name"),
            ));
        }
        if exclusive && interface_exists(name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("an interface named {name} already exists in the namespace"),
            ));
        }
        let excl = if exclusive { libc::IFF_TUN_EXCL } else { 0 };
        let mq = if multi_queue {
            libc::IFF_MULTI_QUEUE
        } else {
            0
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            // IFF_TUN_EXCL: fail with EBUSY rather than attach to an existing device of that
            // name, closing the race with the check above.
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | excl | mq)
                as libc::c_short,
            _pad: [0; 22],
        };
        for (d, s) in req.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: `file` is an open /dev/net/tun descriptor and `req` is a properly sized,
        // initialised `struct ifreq` (name + flags, padded to the kernel's 40 bytes) that
        // outlives the call; TUNSETIFF reads and writes only within it.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EBUSY) {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("an interface named {name} already exists in the namespace"),
                ));
            }
            return Err(e);
        }
        let hdr_len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, which points to a live
        // local of that type.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut tap = Tap {
            file,
            name: name.to_string(),
            offload: false,
            uso: false,
            extra: Vec::new(),
            multi_queue,
        };
        if offload {
            let tso = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
            // UDP segmentation offload (Linux 6.2+): a pod's UDP_SEGMENT send arrives whole.
            // Older kernels refuse the flags with EINVAL; then the pod's kernel segments.
            match tap.set_offload(tso | libc::TUN_F_USO4 | libc::TUN_F_USO6) {
                Ok(()) => tap.uso = true,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => tap.set_offload(tso)?,
                Err(e) => return Err(e),
            }
            tap.offload = true;
        } else {
            tap.set_offload(0)?;
        }
        Ok(tap)
    }

    fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long of flag bits);
        // no memory is passed.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes the device outlive this handle (and the process): a pod keeps its interface, MAC,
    /// address and routes while the switch restarts.
    pub fn set_persist(&self, on: bool) -> io::Result<()> {
        // SAFETY: TUNSETPERSIST takes its argument by value (0 or 1); no memory is passed.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETPERSIST,
                libc::c_ulong::from(on),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Deletes the device: persistence off, then the last queue closes.
    pub fn destroy(self) {
        if let Err(e) = self.set_persist(false) {
            tracing::warn!("TAP {}: clearing persistence: {e}", self.name);
        }
    }

    /// Whether the kernel hands us (and accepts from us) checksum-partial TSO super-frames.
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// Whether the kernel hands us (and accepts from us) UDP super-frames too.
    pub fn uso(&self) -> bool {
        self.uso
    }

    /// Reads one frame, virtio-net header first. `WouldBlock` when the queue is empty.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // One read(2) on the queue's fd: a TAP returns one whole frame per read.
        (&self.file).read(buf)
    }

    /// Writes one frame, virtio-net header first.
    pub fn send(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }

    /// Writes one frame gathered from several slices (virtio-net header first). The kernel
    /// reads them in order as one frame (one writev(2)); at most `IOV_MAX` slices.
    pub fn send_vectored(&self, parts: &[io::IoSlice<'_>]) -> io::Result<usize> {
        (&self.file).write_vectored(parts)
    }

    pub fn into_fd(self) -> OwnedFd {
        self.file.into()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Whether an interface of this name exists in the calling thread's network namespace.
pub fn interface_exists(name: &str) -> bool {
    interface_index(name).is_some()
}

/// The interface index of `name` in the calling thread's network namespace.
pub fn interface_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; if_nametoindex only
    // reads it.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}
