"""Model runners: execute the scheduler's steps on a device."""
