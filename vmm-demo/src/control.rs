//! Run control shared by the VMM and its vCPU threads: pause, resume, exit, throttle.
//!
//! The VMM says what it wants (run, pause, exit) under one mutex; each vCPU thread looks
//! at it at its *park points* (after it is kicked out of guest code) and parks while a
//! pause is wanted. A pause returns once every live vCPU is parked, so no guest code runs
//! and no vCPU touches RAM or its registers.
//!
//! Throttling follows QEMU's CPU throttle: a vCPU that runs for a while then sleeps
//! `percent / (100 - percent)` times as long, so it spends `percent` of its wall time
//! asleep. A KVM vCPU is kicked every [`TIMESLICE`] by a ticker thread to make it look;
//! a software vCPU looks at the clock itself. The sleep is proportional to the time the
//! vCPU actually ran since its last sleep, so late or early kicks do not skew the ratio.

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How long a vCPU runs between two looks at the throttle (QEMU's CPU_THROTTLE_TIMESLICE).
pub const TIMESLICE: Duration = Duration::from_millis(10);

/// What the VMM wants of its vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    Run,
    Pause,
    Exit,
}

struct State {
    want: Want,
    parked: u32,
    live: u32,
    failures: Vec<String>,
}

/// Shared between the VMM and its vCPU threads.
pub(crate) struct RunControl {
    state: Mutex<State>,
    cv: Condvar,
    throttle: AtomicU8,
    pace_ns: AtomicU64,
}

/// What a vCPU thread does after a park point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Parked {
    /// It did not park: carry on.
    Continue,
    /// It parked and was resumed: its state may have been replaced.
    Resumed,
    /// Leave the thread.
    Exit,
}

/// Counters one vCPU keeps.
#[derive(Debug, Default)]
pub(crate) struct VcpuCounters {
    pub run_ns: AtomicU64,
    pub throttle_ns: AtomicU64,
    pub throttle_sleeps: AtomicU64,
    pub exits: AtomicU64,
    /// The kernel thread id of the vCPU's thread once it runs (0 before): what
    /// userfaultfd names a faulting thread by, so that post-copy blocktime can be told
    /// per vCPU.
    pub tid: AtomicU32,
}

/// One vCPU's counters, as reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuStats {
    /// Nanoseconds the vCPU spent running guest code (KVM_RUN, or the software loop).
    pub run_ns: u64,
    /// Nanoseconds it slept because of the throttle.
    pub throttle_ns: u64,
    /// How many times it slept because of the throttle.
    pub throttle_sleeps: u64,
    /// Exits to the VMM (KVM) or kicks seen (software).
    pub exits: u64,
}

impl VcpuCounters {
    pub(crate) fn snapshot(&self) -> VcpuStats {
        VcpuStats {
            run_ns: self.run_ns.load(Ordering::Relaxed),
            throttle_ns: self.throttle_ns.load(Ordering::Relaxed),
            throttle_sleeps: self.throttle_sleeps.load(Ordering::Relaxed),
            exits: self.exits.load(Ordering::Relaxed),
        }
    }

    /// Records the calling thread as the vCPU's.
    pub(crate) fn record_thread(&self) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        self.tid
            .store(u32::try_from(tid).unwrap_or(0), Ordering::Relaxed);
    }

    pub(crate) fn add_run(&self, d: Duration) {
        self.run_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

impl RunControl {
    /// A control for `vcpus` threads, which start parked.
    pub(crate) fn new(vcpus: u32) -> RunControl {
        RunControl {
            state: Mutex::new(State {
                want: Want::Pause,
                parked: 0,
                live: vcpus,
                failures: Vec::new(),
            }),
            cv: Condvar::new(),
            throttle: AtomicU8::new(0),
            pace_ns: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- the vCPU side ----

    /// Parks while a pause is wanted. Called by a vCPU thread whenever it is out of guest
    /// code at a point where its state is complete.
    pub(crate) fn park_point(&self) -> Parked {
        let mut st = self.lock();
        match st.want {
            Want::Run => return Parked::Continue,
            Want::Exit => return Parked::Exit,
            Want::Pause => {}
        }
        st.parked += 1;
        self.cv.notify_all();
        while st.want == Want::Pause {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.parked -= 1;
        if st.want == Want::Exit {
            Parked::Exit
        } else {
            Parked::Resumed
        }
    }

    /// A vCPU thread stops for good because of `why`.
    pub(crate) fn fail(&self, why: String) {
        tracing::error!("{why}");
        let mut st = self.lock();
        st.failures.push(why);
        st.live -= 1;
        self.cv.notify_all();
    }

    /// Sleeps as the throttle says, given that the vCPU has run since `*slice_start`.
    /// Wakes early if the VMM wants something else than running, or lifts the throttle.
    pub(crate) fn throttle(&self, slice_start: &mut Instant, counters: &VcpuCounters) {
        let pct = u32::from(self.throttle.load(Ordering::Relaxed));
        if pct == 0 {
            *slice_start = Instant::now();
            return;
        }
        // A vCPU that ran unthrottled for long before the throttle was set must not
        // sleep for all of it.
        let ran = slice_start.elapsed().min(TIMESLICE * 4);
        let sleep = ran.mul_f64(f64::from(pct) / f64::from(100 - pct));
        let t0 = Instant::now();
        let st = self.lock();
        let _st = self
            .cv
            .wait_timeout_while(st, sleep, |s| {
                s.want == Want::Run && self.throttle.load(Ordering::Relaxed) > 0
            })
            .unwrap_or_else(|e| e.into_inner());
        let slept = t0.elapsed();
        counters
            .throttle_ns
            .fetch_add(slept.as_nanos() as u64, Ordering::Relaxed);
        counters.throttle_sleeps.fetch_add(1, Ordering::Relaxed);
        *slice_start = Instant::now();
    }

    /// The throttle in percent.
    pub(crate) fn throttle_pct(&self) -> u8 {
        self.throttle.load(Ordering::Relaxed)
    }

    /// Least time a software vCPU spends per page, in nanoseconds (0: as fast as it can).
    pub(crate) fn software_pace_ns(&self) -> u64 {
        self.pace_ns.load(Ordering::Relaxed)
    }

    /// Sets [`software_pace_ns`](Self::software_pace_ns).
    pub(crate) fn set_software_pace_ns(&self, ns: u64) {
        self.pace_ns.store(ns, Ordering::Relaxed);
    }

    // ---- the VMM side ----

    /// Asks the vCPUs to park; they must then be kicked. Returns the failures so far.
    pub(crate) fn request(&self, want: Want) {
        let mut st = self.lock();
        if st.want != Want::Exit {
            st.want = want;
        }
        self.cv.notify_all();
    }

    /// What is wanted now.
    pub(crate) fn wanted(&self) -> Want {
        self.lock().want
    }

    /// Waits until every live vCPU is parked, calling `kick` again every 20 ms in case a
    /// vCPU was between two looks. Fails after `timeout`.
    pub(crate) fn wait_parked(&self, kick: &dyn Fn(), timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if st.want == Want::Exit {
                return Err("the VM has been shut down".into());
            }
            if st.parked >= st.live {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "{} of {} vCPUs still running after {timeout:?}",
                    st.live - st.parked,
                    st.live
                ));
            }
            let wait = (deadline - now).min(Duration::from_millis(20));
            st = self
                .cv
                .wait_timeout(st, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if st.parked < st.live {
                drop(st);
                kick();
                st = self.lock();
            }
        }
    }

    /// Is a pause wanted and every live vCPU parked?
    pub(crate) fn all_parked(&self) -> bool {
        let st = self.lock();
        st.want == Want::Pause && st.parked >= st.live
    }

    /// Why vCPUs stopped, if any did.
    pub(crate) fn failures(&self) -> Vec<String> {
        self.lock().failures.clone()
    }

    /// Sets the throttle and wakes the ticker.
    pub(crate) fn set_throttle(&self, pct: u8) {
        self.throttle.store(pct, Ordering::Relaxed);
        let _st = self.lock();
        self.cv.notify_all();
    }

    /// For the ticker thread: blocks until the next tick is due (`true`), or the VM
    /// exits (`false`). Ticks only while throttled and running.
    pub(crate) fn next_tick(&self) -> bool {
        let mut st = self.lock();
        loop {
            if st.want == Want::Exit {
                return false;
            }
            if st.want == Want::Run && self.throttle.load(Ordering::Relaxed) > 0 {
                let (s, timeout) = self
                    .cv
                    .wait_timeout(st, TIMESLICE)
                    .unwrap_or_else(|e| e.into_inner());
                st = s;
                if timeout.timed_out() {
                    return st.want != Want::Exit;
                }
            } else {
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn pause_waits_for_every_thread_and_resume_releases_them() {
        let ctl = Arc::new(RunControl::new(2));
        let steps = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for _ in 0..2 {
            let (ctl, steps) = (ctl.clone(), steps.clone());
            threads.push(std::thread::spawn(move || {
                loop {
                    match ctl.park_point() {
                        Parked::Exit => return,
                        _ => {
                            steps.fetch_add(1, Ordering::SeqCst);
                            std::thread::yield_now();
                        }
                    }
                }
            }));
        }
        ctl.wait_parked(&|| {}, Duration::from_secs(10)).unwrap();
        assert_eq!(steps.load(Ordering::SeqCst), 0);
        ctl.request(Want::Run);
        let t0 = Instant::now();
        while steps.load(Ordering::SeqCst) < 100 {
            assert!(t0.elapsed() < Duration::from_secs(10));
            std::thread::yield_now();
        }
        ctl.request(Want::Pause);
        ctl.wait_parked(&|| {}, Duration::from_secs(10)).unwrap();
        let frozen = steps.load(Ordering::SeqCst);
        // Parked threads make no step, whatever the scheduler does meanwhile.
        for _ in 0..1000 {
            std::thread::yield_now();
        }
        assert_eq!(steps.load(Ordering::SeqCst), frozen);
        ctl.request(Want::Exit);
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn failed_threads_do_not_block_a_pause() {
        let ctl = RunControl::new(1);
        ctl.request(Want::Run);
        ctl.fail("vcpu0: triple fault".into());
        ctl.request(Want::Pause);
        ctl.wait_parked(&|| {}, Duration::from_secs(1)).unwrap();
        assert_eq!(ctl.failures(), vec!["vcpu0: triple fault".to_string()]);
    }

    #[test]
    fn throttle_sleeps_in_proportion_to_running_time() {
        let ctl = RunControl::new(1);
        ctl.request(Want::Run);
        ctl.set_throttle(75);
        let c = VcpuCounters::default();
        let mut start = Instant::now() - Duration::from_millis(10);
        ctl.throttle(&mut start, &c);
        let s = c.snapshot();
        assert_eq!(s.throttle_sleeps, 1);
        // 10 ms of running at 75 % asks for 30 ms of sleep.
        assert!(s.throttle_ns >= 29_000_000, "{s:?}");
    }
}
