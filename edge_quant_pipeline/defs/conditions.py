"""Declarative automation: when a downstream asset partition materializes by itself."""

import dagster as dg

# Downstream assets rebuild when an input is re-materialized or their code (which
# includes the toolchain versions) changes; `eager()` alone ignores code versions.
ON_INPUT_OR_CODE_CHANGE = dg.AutomationCondition.eager() | dg.AutomationCondition.code_version_changed()
# The report reads whatever recipes did evaluate and publish: a failed recipe must not block it,
# which `eager()`'s "no dependency missing" clause would.
ON_ANY_OUTCOME = (
    dg.AutomationCondition.any_deps_updated().since_last_handled()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
) | dg.AutomationCondition.code_version_changed()
# Publishing also waits for the blocking checks upstream (conformance, quality gates).
ON_CHECKED_INPUT_OR_CODE_CHANGE = ON_INPUT_OR_CODE_CHANGE & dg.AutomationCondition.all_deps_blocking_checks_passed()
