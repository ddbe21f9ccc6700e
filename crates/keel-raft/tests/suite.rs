//! openraft's own storage conformance suite against the keel-log store: once through
//! `Suite::test_all`, and once per case so a failure names the case.

#[macro_use]
mod support;

use std::io;

use keel_raft::{KeelLogStore, KeelRaft};
use openraft::testing::log::{StoreBuilder, Suite};
use support::{Builder, MemStateMachine};

type S = Suite<KeelRaft, KeelLogStore, MemStateMachine, Builder, tempfile::TempDir>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_suite_test_all() {
    if let Err(e) = Suite::test_all(Builder).await {
        panic!("suite failed: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_snapshot() -> io::Result<()> {
    S::transfer_snapshot(&Builder).await
}

storage_suite_cases!(
    case,
    Builder;
    last_membership_in_log_initial,
    last_membership_in_log,
    last_membership_in_log_multi_step,
    get_membership_initial,
    get_membership_from_log_and_empty_sm,
    get_membership_from_empty_log_and_sm,
    get_membership_from_log_le_sm_last_applied,
    get_membership_from_log_gt_sm_last_applied_1,
    get_membership_from_log_gt_sm_last_applied_2,
    get_initial_state_without_init,
    get_initial_state_membership_from_empty_log_and_sm,
    get_initial_state_membership_from_sm_inlog_is_smaller,
    get_initial_state_membership_from_log_insm_is_smaller,
    get_initial_state_with_state,
    get_initial_state_last_log_gt_sm,
    get_initial_state_last_log_lt_sm,
    get_initial_state_inverted_log_order,
    get_initial_state_conflict_at_same_index,
    get_initial_state_log_ids,
    get_initial_state_re_apply_committed,
    save_vote,
    get_log_entries,
    limited_get_log_entries,
    leader_bounded_stream,
    entries_stream,
    try_get_log_entry,
    log_reader_reads_new_entries,
    initial_logs,
    get_log_state,
    get_log_id,
    last_id_in_log,
    last_applied_state,
    purge_logs_upto_0,
    purge_logs_upto_5,
    purge_logs_upto_20,
    delete_logs_after_11,
    delete_logs_after_5,
    delete_logs_after_0,
    delete_logs_after_none,
    append_to_log,
    snapshot_meta,
    snapshot_meta_optional,
    apply_single,
    apply_multiple,
);
