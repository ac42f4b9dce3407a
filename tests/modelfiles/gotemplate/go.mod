module forge.test/gotemplate

go 1.19
