"""balloon-load: many protocol guests driven against a host, measured like wrk/vegeta."""
