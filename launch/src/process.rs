//! A child process the harness started, ended only by its own PID.
//!
//! A child's PID stays ours until we reap it, so signals are only sent
//! while the child is unreaped: they can never reach a process that took
//! over the PID.

use std::fs;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

/// How often a child is polled while waiting for it to exit.
const EXIT_POLL: Duration = Duration::from_millis(10);

/// How a stopped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It exited by itself or after the polite signal.
    Exited(ExitStatus),
    /// It outlived the grace period and was killed.
    Killed,
}

/// A spawned child; dropping it kills and reaps it.
#[derive(Debug)]
pub struct Process {
    child: Child,
    /// Holds the PID while the child runs, for outside observers.
    pid_file: Option<PathBuf>,
    /// Set once the child is reaped.
    status: Option<ExitStatus>,
}

impl Process {
    /// Spawns `cmd` in its own process group (a Ctrl-C on the terminal
    /// reaches only the harness, which then stops the children in order)
    /// with `death_signal` sent to it if the spawning thread dies first.
    /// Writes the PID to `pid_file`, if given.
    pub fn spawn(
        cmd: &mut Command,
        death_signal: libc::c_int,
        pid_file: Option<&Path>,
    ) -> io::Result<Process> {
        // SAFETY: getpid is always safe to call.
        let parent = unsafe { libc::getpid() };
        // prctl reads its arguments as unsigned longs.
        let death_signal = libc::c_ulong::try_from(death_signal)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        cmd.process_group(0);
        // SAFETY: the closure runs between fork and exec and only makes
        // async-signal-safe calls (prctl, getppid); it does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The harness died before the death signal was armed.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            })
        };
        let child = cmd.spawn()?;
        let mut process = Process {
            child,
            pid_file: pid_file.map(Path::to_owned),
            status: None,
        };
        if let Some(pid_file) = pid_file
            && let Err(e) = fs::write(pid_file, format!("{}\n", process.pid()))
        {
            process.kill();
            return Err(e);
        }
        Ok(process)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status, once reaped.
    pub fn status(&self) -> Option<ExitStatus> {
        self.status
    }

    /// Reaps the child if it has exited; returns its status then.
    pub fn try_exit(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none()
            && let Some(status) = self.child.try_wait()?
        {
            self.reaped(status);
        }
        Ok(self.status)
    }

    /// Sends `signal` unless the child is already reaped; returns whether
    /// it was sent.
    pub fn signal(&mut self, signal: libc::c_int) -> bool {
        if self.status.is_some() {
            return false;
        }
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            return false;
        };
        // SAFETY: kill(2) with the PID of our unreaped child, which no
        // other process can have.
        unsafe { libc::kill(pid, signal) == 0 }
    }

    /// Waits until `deadline` for the child to exit; reaps it if it did.
    pub fn wait_until(&mut self, deadline: Instant) -> io::Result<Option<ExitStatus>> {
        loop {
            if let Some(status) = self.try_exit()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(EXIT_POLL);
        }
    }

    /// Waits until `deadline` for the child to exit, then kills it; reaps it.
    pub fn finish_by(&mut self, deadline: Instant) -> io::Result<Stopped> {
        if let Some(status) = self.wait_until(deadline)? {
            return Ok(Stopped::Exited(status));
        }
        self.kill();
        match self.status {
            // It may have exited by itself just before the SIGKILL.
            Some(status) if status.signal() != Some(libc::SIGKILL) => Ok(Stopped::Exited(status)),
            Some(_) => Ok(Stopped::Killed),
            None => Err(io::Error::other(format!(
                "process {} could not be reaped",
                self.pid()
            ))),
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if self.status.is_some() {
            return;
        }
        self.signal(libc::SIGKILL);
        if let Ok(status) = self.child.wait() {
            self.reaped(status);
        }
    }

    fn reaped(&mut self, status: ExitStatus) {
        self.status = Some(status);
        if let Some(pid_file) = &self.pid_file {
            let _ = fs::remove_file(pid_file);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Teardown normally reaped it already; this is the last resort.
        self.kill();
    }
}
