"""commands: the `kscan` command line (`cli`), the one-shot commands (`oneshot`:
baseline, check, accept) and `inspect` (`inspection`)."""
