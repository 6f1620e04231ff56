"""The quota plan gate (seed 002): a one-page plan per agent, checked by
`runcap plan check` and turned into ceilings, a default run policy and alert
rules by `runcap plan apply` (docs/quota-plan.md).

Modules, one concept each: `document` (YAML, lines, the JSON Schema),
`model` (the typed plan), `human` (the named-human rule), `costs` (the
figures, integer micro-USD), `rules` (the semantic checks), `check` (the
report), `desired` (the server state a plan implies), `apply` (diff and
writes), `render` (text and JSON).
"""
