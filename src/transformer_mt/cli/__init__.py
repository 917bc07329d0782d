"""Console scripts: tmt-prepare, tmt-train, tmt-evaluate, tmt-translate."""
