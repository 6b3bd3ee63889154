"""Pipeline graphs (importable as `emgate_pipelines`), recipes and the compiled pipeline YAML."""
