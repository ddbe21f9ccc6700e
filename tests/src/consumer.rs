//! `keel consume` processes whose output a test watches as it arrives: consumer-group members
//! that can be killed with -9 or stopped with SIGTERM like any real consumer.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::broker::keel_bin;

/// One printed line and when the test saw it.
#[derive(Debug, Clone)]
pub struct Line {
    pub text: String,
    pub at: Instant,
}

pub struct ConsumerProc {
    pub name: String,
    child: Option<Child>,
    lines: Arc<Mutex<Vec<Line>>>,
    stderr: Option<JoinHandle<String>>,
}

impl ConsumerProc {
    /// `keel consume ARGS --brokers BROKERS`.
    pub fn start(name: &str, brokers: &str, args: &[&str]) -> Self {
        let mut child = Command::new(keel_bin())
            .arg("consume")
            .args(args)
            .args(["--brokers", brokers])
            .env_remove("KEEL_BROKERS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keel consume");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("stdout");
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(text) = line else { break };
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(Line {
                        text,
                        at: Instant::now(),
                    });
            }
        });
        let mut err = child.stderr.take().expect("stderr");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Self {
            name: name.to_owned(),
            child: Some(child),
            lines,
            stderr: Some(stderr),
        }
    }

    /// Every line printed so far.
    pub fn lines(&self) -> Vec<Line> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn count(&self) -> usize {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    /// `kill -9`: no commit, no leave; the group notices when its session times out.
    pub fn kill9(&mut self) {
        self.signal("-KILL");
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGTERM, then the exit status and stderr (bounded wait).
    pub fn terminate(&mut self) -> (ExitStatus, String) {
        self.signal("-TERM");
        self.wait_exit(Duration::from_secs(30))
    }

    /// Waits for the process to end on its own (bounded) and returns its status and stderr.
    pub fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let s = child.wait().expect("wait");
                let err = self.stderr.take().and_then(|h| h.join().ok());
                panic!(
                    "{} did not exit within {timeout:?} ({s}); stderr: {err:?}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let err = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        (status, err)
    }
}

impl Drop for ConsumerProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
