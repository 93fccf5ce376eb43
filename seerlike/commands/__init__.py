"""Command-line entry points that start training: `seerlike train`, `seerlike distill`, and the
local launcher that starts one process per rank. The engine never imports these."""
