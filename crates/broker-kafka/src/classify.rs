//! Whose fault a failed produce is (docs/contract.md §A.7, §A.8): the event's own (it fails alone as
//! `Rejected`, with no producer reset, its neighbours untouched) or the service's (it waits and
//! goes again).

use rdkafka::types::RDKafkaErrorCode as C;

/// Whether an event that failed with `code` is to blame itself: too large (for the message or a
/// batch), invalid (`InvalidRecord`: e.g. a null key on a compacted topic), or refused by
/// authorization or a topic policy.
pub(crate) fn events_fault(code: Option<C>) -> bool {
    matches!(
        code,
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessage
                | C::InvalidMessageSize
                | C::InvalidRecord
                | C::MessageBatchTooLarge
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::PolicyViolation
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_events_own_faults_and_the_rest() {
        for code in [C::MessageSizeTooLarge, C::InvalidRecord, C::MessageBatchTooLarge, C::PolicyViolation] {
            assert!(events_fault(Some(code)), "{code:?}");
        }
        for code in [C::Fatal, C::Unknown, C::AllBrokersDown, C::NotLeaderForPartition, C::RequestTimedOut] {
            assert!(!events_fault(Some(code)), "{code:?}");
        }
        assert!(!events_fault(None));
    }
}
