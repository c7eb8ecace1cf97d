//! CPU time used by the bench process, the broker and the handler processes, from Linux
//! `/proc`, so a bench can report what one event costs each of them. Elsewhere every reading
//! is `None` and the figures are left out.

use serde::Serialize;

/// Clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`, fixed at 100 on Linux whatever the
/// kernel's own tick rate).
const USER_HZ: f64 = 100.0;

/// CPU seconds used so far.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    /// This process: the bench client and, in the full path, the listener and worker.
    own: f64,
    broker: f64,
    /// Children other than the broker: the handler processes.
    handlers: f64,
}

/// CPU microseconds per event between two samples.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuPerEvent {
    pub own_us: f64,
    pub broker_us: f64,
    pub handlers_us: f64,
}

/// (parent pid, user + system seconds) of `pid`.
fn stat(pid: u32) -> Option<(u32, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    Some((
        fields.get(1)?.parse().ok()?,
        (ticks(11)? + ticks(12)?) / USER_HZ,
    ))
}

/// Now, for this process, the broker (`broker_pid`) and every other child process.
pub fn sample(broker_pid: u32) -> Option<CpuSample> {
    let me = std::process::id();
    let own = stat(me)?.1;
    let broker = stat(broker_pid)?.1;
    let handlers = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != broker_pid)
        .filter_map(stat)
        .filter(|(parent, _)| *parent == me)
        .map(|(_, seconds)| seconds)
        .sum();
    Some(CpuSample {
        own,
        broker,
        handlers,
    })
}

impl CpuSample {
    /// What each of them used per event from `self` to `later`. Handler processes that exited
    /// in between are not counted (a pool that scaled down).
    pub fn per_event(&self, later: &CpuSample, events: usize) -> CpuPerEvent {
        let us = |a: f64, b: f64| (b - a).max(0.0) * 1e6 / events.max(1) as f64;
        CpuPerEvent {
            own_us: us(self.own, later.own),
            broker_us: us(self.broker, later.broker),
            handlers_us: us(self.handlers, later.handlers),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_and_counts_busy_work() {
        let me = std::process::id();
        let (parent, before) = stat(me).expect("/proc/self/stat");
        assert_eq!(parent, std::os::unix::process::parent_id());
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(300) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let (_, after) = stat(me).expect("/proc/self/stat");
        // 300 ms of spinning, counted in 10 ms ticks; a loaded machine may deschedule us.
        assert!(after - before >= 0.05, "{before} → {after}");
    }

    #[test]
    fn per_event_divides_the_difference() {
        let a = CpuSample {
            own: 1.0,
            broker: 2.0,
            handlers: 0.5,
        };
        let b = CpuSample {
            own: 2.0,
            broker: 2.5,
            handlers: 0.4,
        };
        let p = a.per_event(&b, 1000);
        assert_eq!(p.own_us, 1000.0);
        assert_eq!(p.broker_us, 500.0);
        // A pool that shrank does not make the handlers' cost negative.
        assert_eq!(p.handlers_us, 0.0);
    }
}
