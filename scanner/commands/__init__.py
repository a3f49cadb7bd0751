"""commands: the `kscan` command line — entry point (`cli`), parser (`parser`; shared
option types and the recording `Parser` in `options`), one-shot commands (`handlers`,
their text in `render`), `run`'s policy (`run_policy`) and configuration file
(`config`); the work of baseline, check, accept (`oneshot`, `offline` for --core),
`inspect` (`inspection`), the signed bundles of `export`/`import` (`bundles`), and
`status`, `events`, `baseline list|rm`, `profile rm` (`status`, `events_cmd`, `stored`)."""
