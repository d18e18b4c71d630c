//! No panic crosses this crate's API: third-party decoders (DICOM, JPEG 2000, NIfTI, PNG,
//! JPEG, zip) run on untrusted bytes, and a panic in one of them must become an error row,
//! not take down a worker and every job it holds.

use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `f`, turning a panic into `Err` with a message that names `what` (never the panic's
/// payload, which could quote the input).
pub fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    // AssertUnwindSafe: `f` owns or borrows only the input being decoded, which is dropped or
    // left unused after a panic; nothing shared is observed in a broken state.
    catch_unwind(AssertUnwindSafe(f)).map_err(|_| format!("the {what} decoder failed on this input (it panicked)"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_panic_becomes_an_error() {
        let r: Result<u8, String> = super::guarded("test", || panic!("boom"));
        assert_eq!(r.unwrap_err(), "the test decoder failed on this input (it panicked)");
        assert_eq!(super::guarded("test", || 3), Ok(3));
    }
}
