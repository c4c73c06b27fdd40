"""Reports: what a run leaves (result.json, junit.xml, evidence) and how a person reads it."""
