//! The International Clinical Diabetic Retinopathy (ICDR) severity scale.

use serde::{Deserialize, Serialize};
use std::fmt;

/// An ICDR grade, 0 (no apparent retinopathy) to 4 (proliferative DR).
///
/// "Referable" DR is grade 2 (moderate non-proliferative) or worse: the threshold used by
/// screening programmes and by the Gulshan et al. (2016) evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum Grade {
    /// 0: no apparent retinopathy.
    None = 0,
    /// 1: mild non-proliferative DR (microaneurysms only).
    Mild = 1,
    /// 2: moderate non-proliferative DR.
    Moderate = 2,
    /// 3: severe non-proliferative DR (4-2-1 rule).
    Severe = 3,
    /// 4: proliferative DR (neovascularization, vitreous/preretinal haemorrhage).
    Proliferative = 4,
}

/// Number of ICDR grades.
pub const NUM_GRADES: usize = 5;

/// Lowest grade that is referable.
pub const REFERABLE_FROM: Grade = Grade::Moderate;

impl Grade {
    /// Every grade, in order.
    pub const ALL: [Grade; NUM_GRADES] = [
        Grade::None,
        Grade::Mild,
        Grade::Moderate,
        Grade::Severe,
        Grade::Proliferative,
    ];

    /// The grade as its ICDR number.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The grade for an ICDR number, if it is one.
    pub fn from_index(i: usize) -> Option<Grade> {
        Self::ALL.get(i).copied()
    }

    /// Whether this grade is referable (moderate or worse).
    pub fn is_referable(self) -> bool {
        self >= REFERABLE_FROM
    }

    /// The short name used in reports: none, mild, moderate, severe, proliferative.
    pub fn name(self) -> &'static str {
        match self {
            Grade::None => "none",
            Grade::Mild => "mild",
            Grade::Moderate => "moderate",
            Grade::Severe => "severe",
            Grade::Proliferative => "proliferative",
        }
    }

    /// Default class names of the diagnosis head, in grade order.
    pub fn class_names() -> Vec<String> {
        Self::ALL.iter().map(|g| g.name().to_string()).collect()
    }
}

impl fmt::Display for Grade {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.index(), self.name())
    }
}

impl TryFrom<u8> for Grade {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, Self::Error> {
        Grade::from_index(v as usize).ok_or_else(|| format!("grade {v} is outside 0-4"))
    }
}

impl From<Grade> for u8 {
    fn from(g: Grade) -> u8 {
        g as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn referable_starts_at_moderate() {
        let referable: Vec<bool> = Grade::ALL.iter().map(|g| g.is_referable()).collect();
        assert_eq!(referable, [false, false, true, true, true]);
    }

    #[test]
    fn round_trips_through_numbers_and_rejects_5() {
        for g in Grade::ALL {
            assert_eq!(Grade::try_from(u8::from(g)).unwrap(), g);
        }
        assert!(Grade::try_from(5).is_err());
    }
}
