//! One line of the isrctl ⇄ isrfsd control protocol through
//! `control::receive` (with the daemon's and the client's line limits), as a
//! request (what isrfsd reads) and as a response
//! (what isrctl reads); a request's wire parcels are opened (hex secrets, id)
//! as the daemon does, and every decoded message is sent back out.
#![no_main]

use isr::control::{self, Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(envelope)) =
        control::receive::<Request>(&mut &data[..], control::MAX_REQUEST_BYTES)
    {
        match &envelope.body {
            Request::Resume { parcel, .. } => {
                let _ = parcel.open();
            }
            Request::Checkin {
                save_as, reopen, ..
            } => {
                if let Some(parcel) = save_as {
                    let _ = parcel.open();
                }
                if let Some(reopen) = reopen {
                    let _ = reopen.parcel.open();
                }
            }
            Request::Suspend {
                reopen: Some(reopen),
                ..
            } => {
                let _ = reopen.parcel.open();
            }
            _ => {}
        }
        let mut out = Vec::new();
        control::send(&mut out, envelope.body).expect("a decoded request encodes");
    }
    if let Ok(Some(envelope)) =
        control::receive::<Response>(&mut &data[..], control::MAX_REPLY_BYTES)
    {
        let mut out = Vec::new();
        control::send(&mut out, envelope.body).expect("a decoded response encodes");
    }
});
