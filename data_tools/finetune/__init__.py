"""Fine-tuning data: task records (xP3 inputs/targets, prompt/response, chat, labelled or parallel tables
through a template) in, token files with a loss mask per dataset and split, and a fine-tuning blend out.

    python -m data_tools.finetune preset=nusax_sentiment tokenizer=runs/demo output.dir=data/nusax-ft

``config.py`` (the schema), ``records.py`` (records to prompt/target segments, bad records by reason),
``encode.py`` (segments to tokens and a loss mask, the prompt/target boundary checked), ``write.py``
(token files, the blend and the report), ``__main__.py`` (the command).
"""
