"""Knowledge editing: edit requests (EasyEdit, ZsRE and CounterFact files) and the packaged country edits."""
