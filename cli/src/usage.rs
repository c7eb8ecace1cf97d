//! CPU time and memory of the bench process, the broker and the handler processes, from Linux
//! `/proc`, so a bench can report what one event costs each of them and what a warm instance
//! holds. Elsewhere every reading is `None` and the figures are left out.

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
    /// Descendants other than the broker: the handler processes.
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

/// Now, for this process, the broker (`broker_pid`) and every other process descended from
/// this one.
pub fn sample(broker_pid: u32) -> Option<CpuSample> {
    Some(CpuSample {
        own: stat(std::process::id())?.1,
        broker: stat(broker_pid)?.1,
        handlers: descendants(broker_pid)?
            .iter()
            .map(|(_, seconds)| seconds)
            .sum(),
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

/// Resident memory of a set of processes, in MiB.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ProcessMemory {
    pub processes: usize,
    /// Resident set: pages shared between the processes (the runtime's code) count in each.
    pub rss_mib: f64,
    /// Proportional set: a shared page counts in each process as its share.
    pub pss_mib: f64,
}

/// (RSS, PSS) of `pid` in KiB.
fn memory_kib(pid: u32) -> Option<(f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse::<f64>()
            .ok()
    };
    Some((field("Rss:")?, field("Pss:")?))
}

/// Every process descended from this one (children, their children, …) except `skip` (the
/// broker) and its descendants, with the CPU seconds each has used.
fn descendants(skip: u32) -> Option<Vec<(u32, f64)>> {
    let processes: Vec<(u32, u32, f64)> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| stat(pid).map(|(ppid, seconds)| (pid, ppid, seconds)))
        .collect();
    let mut family = vec![(std::process::id(), 0.0)];
    let mut i = 0;
    while let Some(&(parent, _)) = family.get(i) {
        family.extend(
            processes
                .iter()
                .filter(|(pid, ppid, _)| *ppid == parent && *pid != skip)
                .map(|(pid, _, seconds)| (*pid, *seconds)),
        );
        i += 1;
    }
    family.remove(0);
    Some(family)
}

/// The memory of every process descended from this one except the broker (`skip`): the
/// handler processes and whatever they started.
pub fn descendants_memory(skip: u32) -> Option<ProcessMemory> {
    let (mut rss, mut pss, mut processes) = (0.0, 0.0, 0);
    for (r, p) in descendants(skip)?
        .into_iter()
        .filter_map(|(pid, _)| memory_kib(pid))
    {
        rss += r;
        pss += p;
        processes += 1;
    }
    Some(ProcessMemory {
        processes,
        rss_mib: rss / 1024.0,
        pss_mib: pss / 1024.0,
    })
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
    fn finds_grandchildren_and_their_memory() {
        // sh → sleep: the sleep is a grandchild.
        let mut sh = std::process::Command::new("sh")
            .args(["-c", "sleep 5 & wait"])
            .spawn()
            .expect("sh");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let grandchild = loop {
            let found = descendants(0)
                .expect("/proc")
                .into_iter()
                .map(|(pid, _)| pid)
                .find(|pid| stat(*pid).is_some_and(|(parent, _)| parent == sh.id()));
            if found.is_some() || std::time::Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let memory = descendants_memory(0).expect("/proc");
        // As the broker is: left out with its descendants.
        let without_sh: Vec<u32> = descendants(sh.id())
            .expect("/proc")
            .into_iter()
            .map(|(pid, _)| pid)
            .collect();
        let _ = sh.kill();
        let _ = sh.wait();
        let grandchild = grandchild.expect("sleep not found among the descendants");
        assert!(!without_sh.contains(&sh.id()) && !without_sh.contains(&grandchild));
        assert!(memory.processes >= 2, "{memory:?}");
        assert!(memory.rss_mib > 0.0 && memory.pss_mib > 0.0, "{memory:?}");
        assert!(memory.pss_mib <= memory.rss_mib, "{memory:?}");
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
