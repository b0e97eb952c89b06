//! keygate-core
