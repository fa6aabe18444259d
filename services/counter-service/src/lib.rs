//! Production counters, registers and sets replicated as CRDTs.
