//! Real-time priority for the bench's own measuring threads.
//!
//! On a busy machine a thread woken by a notification may wait for a CPU; its timestamp would
//! then include that wait. The link monitor and the injecting thread run SCHED_FIFO so that
//! they run as soon as they are woken and their timestamps are taken when things happen. They
//! do little (parse one notification, send one request) and always block again, so the agent
//! and the shell guard keep their CPUs.

/// SCHED_FIFO priority: above every normal thread, below the kernel's own RT threads.
const PRIORITY: i32 = 10;

fn set(policy: i32, priority: i32) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: pid 0 is the calling thread; `param` is valid for the call.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the calling thread SCHED_FIFO for good; whether that worked.
pub fn realtime() -> bool {
    set(libc::SCHED_FIFO, PRIORITY).is_ok()
}

/// The calling thread SCHED_FIFO until dropped.
pub struct Realtime {
    on: bool,
}

impl Realtime {
    pub fn new() -> Self {
        Self { on: realtime() }
    }
}

impl Drop for Realtime {
    fn drop(&mut self) {
        if self.on {
            let _ = set(libc::SCHED_OTHER, 0);
        }
    }
}
