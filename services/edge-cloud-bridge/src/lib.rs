//! Ships safety state and counter aggregates to the cloud and pulls configuration down.
