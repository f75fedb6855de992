//! Umbrella package: see tests/.
