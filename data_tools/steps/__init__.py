"""Pipeline steps: each consumes documents and yields documents, recording what it kept and dropped.

A pipeline is a list of steps (``base.PipelineStep``); most are filters (``base.DocumentFilter``) that
keep a document or name the reason it goes. Readers start a pipeline from files.
"""
