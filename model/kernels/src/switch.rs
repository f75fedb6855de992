//! The switch that turns the kernels off: every unit then runs on burn's own operations.
//!
//! Why: to tell whether a difference (a wrong value, a speed change, a crash) comes from the
//! network or from a kernel, and to check the kernels against burn's operations on the whole
//! network. The process-wide setting comes from `RETINA_KERNELS` (read once, at the first plan),
//! and [`set_enabled`] overrides it; [`scoped`] overrides both on one thread for a while (tests
//! run in parallel threads of one process). Plans are made on the thread that calls the
//! network, so a scoped setting covers the whole pass, its backward included.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};

/// The environment variable read once for the process-wide setting: `off`, `0`, `false` or `no`
/// (any case) turn the kernels off; unset, empty, `on`, `1`, `true` or `yes` leave them on.
/// Any other value is reported once on stderr, naming the variable, and the kernels stay on.
pub const ENV: &str = "RETINA_KERNELS";

const UNSET: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;

static PROCESS: AtomicU8 = AtomicU8::new(UNSET);

thread_local! {
    static THREAD: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Whether the kernels run: this thread's [`scoped`] setting, else the process's
/// ([`set_enabled`], else [`ENV`], else on).
pub fn enabled() -> bool {
    THREAD
        .with(Cell::get)
        .unwrap_or_else(|| match PROCESS.load(Ordering::Relaxed) {
            UNSET => {
                let on = from_env();
                // A concurrent `set_enabled` wins over the environment.
                let _ = PROCESS.compare_exchange(
                    UNSET,
                    if on { ON } else { OFF },
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                PROCESS.load(Ordering::Relaxed) == ON
            }
            v => v == ON,
        })
}

/// Turns the kernels on or off for the whole process (over [`ENV`]; a [`scoped`] setting still
/// wins on its thread).
pub fn set_enabled(on: bool) {
    PROCESS.store(if on { ON } else { OFF }, Ordering::Relaxed);
}

/// Turns the kernels on or off on this thread until the returned guard drops; guards nest.
pub fn scoped(on: bool) -> Scoped {
    Scoped {
        previous: THREAD.with(|t| t.replace(Some(on))),
        _not_send: std::marker::PhantomData,
    }
}

/// A [`scoped`] setting; dropping it restores the one before.
#[must_use = "the setting ends when the guard drops"]
#[derive(Debug)]
pub struct Scoped {
    previous: Option<bool>,
    // The setting belongs to the thread that made it.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for Scoped {
    fn drop(&mut self) {
        THREAD.with(|t| t.set(self.previous));
    }
}

fn from_env() -> bool {
    match std::env::var(ENV) {
        Err(std::env::VarError::NotPresent) => true,
        Ok(v) => parse(&v).unwrap_or_else(|| unknown(&v)),
        Err(std::env::VarError::NotUnicode(v)) => unknown(&v.to_string_lossy()),
    }
}

/// A value the switch does not know: said on stderr (a bad setting must not stop a run or a
/// server), and the default kept.
fn unknown(v: &str) -> bool {
    eprintln!(
        "warning: {ENV}={v:?} is not a setting: use `off` (burn's own operations) or `on` (the \
         CPU kernels); the kernels stay on"
    );
    true
}

fn parse(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "" | "on" | "1" | "true" | "yes" => Some(true),
        "off" | "0" | "false" | "no" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse() {
        for v in ["off", "OFF", " 0", "false", "no"] {
            assert_eq!(parse(v), Some(false), "{v}");
        }
        for v in ["", "on", "1", "True", "yes"] {
            assert_eq!(parse(v), Some(true), "{v}");
        }
        assert_eq!(parse("fast"), None);
    }

    #[test]
    fn scoped_settings_nest_and_restore() {
        let outer = enabled();
        {
            let _off = scoped(false);
            assert!(!enabled());
            {
                let _on = scoped(true);
                assert!(enabled());
            }
            assert!(!enabled());
        }
        assert_eq!(enabled(), outer);
    }
}
