"""The knowledge base: retrieval-augmented generation over a Chroma collection.

==================  ===========================================================
module              what it does
==================  ===========================================================
:mod:`.chunking`    documents -> overlapping chunks with stable ids
:mod:`.embeddings`  texts -> vectors, litellm through the sidecar's egress
:mod:`.store`       the Chroma collection (embedded on disk, or a Chroma server)
:mod:`.base`        :class:`KnowledgeBase`: ingest, delete, search, the
                    ``search_knowledge`` tool, the passages message
:mod:`.rest`        ``POST``/``DELETE /v1/knowledge/documents``
:mod:`.errors`      :class:`KnowledgeError` and its subclasses
==================  ===========================================================

See ``docs/knowledge.md`` for the choice of store and how retrieval reaches the model.
Import from the modules: this package stays light (the engine's server imports
:mod:`.rest` without pulling in litellm or chromadb).
"""

__all__: list[str] = []
