//! The fault-injection suite's pure parts: the fault kinds (`kind.rs`), a seeded schedule of
//! them (`schedule.rs`), and the checker that verifies the brief's invariants from a recorded
//! history (`history.rs`, `check/`), and whether retention ran (`retention.rs`). No IO, so all
//! of it is unit-tested and a failing run can be replayed from its printed seed.

mod check;
mod history;
mod kind;
pub mod retention;
mod schedule;

pub use check::{Report, check};
pub use history::{
    Batch, CommitOutcome, History, Member, MemberEvent, MetadataCopies, OffsetsEntry, Outcome,
    Replicas,
};
pub use kind::{Also, Fault, FaultKind, Kinds, Netem, Params, Target, wipes_wanted};
pub use schedule::{Rng, first_pass, first_pass_pairs, new_replicas, schedule, schedule_pairs};
