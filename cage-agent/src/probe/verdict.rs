//! Verdicts: what a probe proves, the witness and the prober taken together.

use std::fmt;

use super::{Attempt, Outcome, Record};

/// What a probe proves, the witness and the prober taken together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The witness saw it arrive and the prober got the answer.
    Delivered,
    /// The witness saw nothing arrive and the prober got no answer.
    Blocked,
    /// The witness saw it arrive but the prober got no answer: a packet got through a
    /// policy that (perhaps) only stopped the way back. A deny that leaks.
    Leaked,
    /// The prober got an answer the witness never saw arrive: something else answered
    /// (a proxy, a redirect, another host with the address).
    Inconsistent,
}

impl Verdict {
    pub fn of(outcome: &Outcome, witnessed: bool) -> Verdict {
        match (witnessed, outcome.answered()) {
            (true, true) => Verdict::Delivered,
            (false, false) => Verdict::Blocked,
            (true, false) => Verdict::Leaked,
            (false, true) => Verdict::Inconsistent,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Delivered => "delivered",
            Verdict::Blocked => "blocked",
            Verdict::Leaked => "LEAKED",
            Verdict::Inconsistent => "INCONSISTENT",
        })
    }
}

/// A judged probe.
#[derive(Debug, Clone)]
pub struct Observation {
    pub attempt: Attempt,
    /// The witness's records of this probe.
    pub seen: Vec<Record>,
    pub verdict: Verdict,
}

impl Observation {
    /// One line: the verdict, the prober's outcome and what the witness saw.
    pub fn summary(&self) -> String {
        let seen = match self.seen.first() {
            None => "witness saw nothing".to_owned(),
            Some(r) if self.seen.len() == 1 => format!("witness saw {r}"),
            Some(r) => format!("witness saw {r} (+{} more)", self.seen.len() - 1),
        };
        format!("{}: {}; {seen}", self.verdict, self.attempt.outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        assert_eq!(Verdict::of(&Outcome::Answered, true), Verdict::Delivered);
        assert_eq!(Verdict::of(&Outcome::TimedOut, false), Verdict::Blocked);
        assert_eq!(
            Verdict::of(&Outcome::Refused("x".into()), false),
            Verdict::Blocked
        );
        assert_eq!(Verdict::of(&Outcome::TimedOut, true), Verdict::Leaked);
        assert_eq!(
            Verdict::of(&Outcome::Answered, false),
            Verdict::Inconsistent
        );
    }
}
