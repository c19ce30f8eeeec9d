"""Files and the data contract: where every file of a study lives (layout), atomic writes and the
marks that tell our files from the user's, output-folder checks, the manifest, local and gs:// storage,
packaged assets, and each artifact's provenance and lineage. Torch-free."""
