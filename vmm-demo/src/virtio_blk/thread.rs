//! The device thread of a KVM guest's disk: it sleeps in `poll` on the queue's ioeventfd
//! (which KVM signals when the guest writes QueueNotify, without leaving the kernel) and on
//! a stop eventfd; woken, it processes the queue one request per hold of the device lock,
//! so that a pause taking the lock waits for one request at most.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::BlkDevice;

/// The body of the device thread. Returns when `stop` is signalled.
pub(crate) fn run(dev: Arc<Mutex<BlkDevice>>, notify: EventFd, stop: EventFd) {
    let mut fds = [
        libc::pollfd {
            fd: notify.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call, and
        // both descriptors stay open (owned by this function's arguments).
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(%e, "virtio-blk device thread: poll failed; the device stops");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            // Reading resets the counter: notifications arriving from now on wake the
            // next poll, so none is lost between this read and the queue's last entry.
            let _ = notify.read();
            loop {
                let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
                if !d.process_one() {
                    break;
                }
            }
        }
    }
}
