//! PVC scheduling: which reflection hits become calibrations.
