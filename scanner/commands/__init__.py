"""commands: the `kscan` command line (`cli`), the one-shot commands (`oneshot`:
baseline, check, accept), `inspect` (`inspection`) and the signed baseline bundles
of `export` and `import` (`bundles`)."""
