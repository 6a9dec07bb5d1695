"""zopro's Textual workbench: screens and widgets that read run directories and write control requests."""
