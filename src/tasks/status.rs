//! Where a task stands: one list, in `TaskStatus`' order, with the text the
//! store and the Python enum use for each.

/// How many statuses there are.
pub const COUNT: usize = 7;

/// Where a task stands; the numbers index `TaskStatus` members in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Pending = 0,
    Scheduled = 1,
    Running = 2,
    Retrying = 3,
    Completed = 4,
    Failed = 5,
    Cancelled = 6,
}

impl Status {
    pub const ALL: [Status; COUNT] = [
        Status::Pending,
        Status::Scheduled,
        Status::Running,
        Status::Retrying,
        Status::Completed,
        Status::Failed,
        Status::Cancelled,
    ];

    pub fn from_u8(v: u8) -> Self {
        Self::ALL
            .get(usize::from(v))
            .copied()
            .unwrap_or(Status::Cancelled)
    }

    /// The text of this status in the store and in `TaskStatus.value`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Scheduled => "scheduled",
            Status::Running => "running",
            Status::Retrying => "retrying",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }

    pub fn is_waiting(self) -> bool {
        matches!(self, Status::Pending | Status::Scheduled | Status::Retrying)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_text_and_kinds_agree() {
        for (i, s) in Status::ALL.into_iter().enumerate() {
            assert_eq!(s as usize, i);
            assert_eq!(Status::from_u8(i as u8), s);
            assert_eq!(Status::parse(s.as_str()), Some(s));
            assert!(s.is_final() != (s.is_waiting() || s == Status::Running));
        }
        assert_eq!(Status::parse("Pending"), None);
    }
}
