package system.log_test

import data.system.log

test_personal_data_and_addresses_are_masked if {
	log.mask == {
		"/input/identity/email",
		"/input/identity/attributes",
		"/input/identity/on_behalf_of/email",
		"/input/identity/on_behalf_of/attributes",
		"/input/request/source_ip",
	}
}
