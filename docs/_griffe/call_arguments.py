"""A griffe extension for the docs build: Keras docstrings' "Call arguments:".

Keras documents a layer's `call` arguments in the class docstring under
"Call arguments:", a section Google style does not have, so griffe reads it
as an admonition and renders its entries as one paragraph. This extension
parses such a section as a parameters list (titled "Call arguments"), without
checking the names against the constructor's signature.
"""

import textwrap

import griffe


class CallArguments(griffe.Extension):
    def on_object(self, *, obj, **kwargs):
        docstring = obj.docstring
        if docstring is None or "Call arguments:" not in docstring.value:
            return
        sections = []
        for section in docstring.parse("google", warn_missing_types=False):
            if isinstance(section, griffe.DocstringSectionAdmonition) and section.title == "Call arguments":
                # A summary line first: griffe dedents every line after the first.
                text = "Call.\n\nOther parameters:\n" + textwrap.indent(section.value.contents, "    ")
                parsed = griffe.Docstring(text, parent=obj).parse("google", warn_missing_types=False)
                section = next(s for s in parsed if s.kind is griffe.DocstringSectionKind.other_parameters)
                section.title = "Call arguments"
            sections.append(section)
        docstring.__dict__["parsed"] = sections
