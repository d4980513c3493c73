import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.Properties;

import org.postgresql.PGStatement;

/**
 * PostgreSQL's JDBC driver against querygate's wire endpoint, for
 * tests/integration/test_pgwire_clients.py: {@code java PgjdbcClient PORT}, with the tokens in
 * QG_READER_TOKEN (alice, analysts) and QG_WRITER_TOKEN (wendy, dba).
 *
 * <p>Each scenario prints tab-separated lines, {@code scenario key value...}; an SQLException is
 * printed as {@code scenario error SQLSTATE message}, never thrown, so the test sees every
 * scenario's outcome. Only a failure outside JDBC ends the program with a stack trace.
 */
public final class PgjdbcClient {
    private static final String CUSTOMER =
            "SELECT id, email, ssn, card_number FROM customers WHERE id = ?";

    private PgjdbcClient() {
    }

    public static void main(String[] args) throws SQLException {
        String url = "jdbc:postgresql://127.0.0.1:" + args[0] + "/appdb";
        String reader = System.getenv("QG_READER_TOKEN");
        String writer = System.getenv("QG_WRITER_TOKEN");
        try (Connection conn = connect(url, "alice", reader)) {
            out("connect", "version", conn.getMetaData().getDatabaseProductVersion());
            metadata(conn);
            prepared(conn);
            denial(conn);
        } catch (SQLException exc) {
            error("connect", exc);
        }
        try (Connection conn = connect(url, "wendy", writer)) {
            blastRadius(conn);
        } catch (SQLException exc) {
            error("connect", exc);
        }
        out("done");
    }

    private static Connection connect(String url, String user, String token) throws SQLException {
        Properties props = new Properties();
        props.setProperty("user", user);
        props.setProperty("password", token);
        props.setProperty("sslmode", "disable");
        props.setProperty("ApplicationName", "querygate-pgjdbc-test");
        return DriverManager.getConnection(url, props);
    }

    /**
     * DatabaseMetaData, as DBeaver's and DataGrip's navigators use it: schemas, tables,
     * columns, keys and indexes, each a catalog query the gateway decides and PostgreSQL
     * filters to what the caller's profile may see.
     */
    private static void metadata(Connection conn) {
        try {
            java.sql.DatabaseMetaData md = conn.getMetaData();
            try (ResultSet rs = md.getSchemas()) {
                while (rs.next()) {
                    out("metadata", "schema", rs.getString("TABLE_SCHEM"));
                }
            }
            try (ResultSet rs = md.getTables(null, null, "%", new String[] {"TABLE", "VIEW"})) {
                while (rs.next()) {
                    out("metadata", "table", rs.getString("TABLE_SCHEM") + "." + rs.getString("TABLE_NAME"));
                }
            }
            try (ResultSet rs = md.getColumns(null, null, "customers", "%")) {
                while (rs.next()) {
                    out("metadata", "column", rs.getString("COLUMN_NAME"), rs.getString("TYPE_NAME"));
                }
            }
            try (ResultSet rs = md.getPrimaryKeys(null, null, "orders")) {
                while (rs.next()) {
                    out("metadata", "key", rs.getString("COLUMN_NAME"));
                }
            }
            try (ResultSet rs = md.getIndexInfo(null, null, "orders", false, true)) {
                int n = 0;
                while (rs.next()) {
                    n++;
                }
                out("metadata", "indexes", Integer.toString(n));
            }
            out("metadata", "done");
        } catch (SQLException exc) {
            error("metadata", exc);
        }
    }

    /** Parameterised reads; the driver moves to a named server statement at prepareThreshold (5). */
    private static void prepared(Connection conn) {
        try (PreparedStatement ps = conn.prepareStatement(CUSTOMER)) {
            for (int id = 1; id <= 7; id++) {
                ps.setInt(1, id);
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) {
                        out("prepared", "row", Integer.toString(rs.getInt(1)), rs.getString(2),
                                rs.getString(3), rs.getString(4));
                    }
                }
            }
            out("prepared", "server_prepared",
                    Boolean.toString(ps.unwrap(PGStatement.class).isUseServerPrepare()));
        } catch (SQLException exc) {
            error("prepared", exc);
        }
        try (PreparedStatement ps = conn.prepareStatement(
                "SELECT count(*) FROM orders WHERE status = ? AND id <= ?")) {
            ps.setString(1, "shipped");
            ps.setLong(2, 100L);
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                out("count", "value", Long.toString(rs.getLong(1)));
            }
        } catch (SQLException exc) {
            error("count", exc);
        }
    }

    private static void denial(Connection conn) {
        try (Statement st = conn.createStatement()) {
            st.execute("DROP TABLE orders");
            out("denial", "ran");
        } catch (SQLException exc) {
            error("denial", exc);
        }
        // The session goes on after a refusal.
        try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery("SELECT 1")) {
            rs.next();
            out("after_denial", "value", Integer.toString(rs.getInt(1)));
        } catch (SQLException exc) {
            error("after_denial", exc);
        }
    }

    /** A write over the blast radius in an explicit transaction: refused, rolled back, unchanged. */
    private static void blastRadius(Connection conn) throws SQLException {
        conn.setAutoCommit(false);
        try (Statement st = conn.createStatement()) {
            int rows = st.executeUpdate("UPDATE orders SET status = 'x' WHERE id <= 1500");
            out("blast", "updated", Integer.toString(rows));
        } catch (SQLException exc) {
            error("blast", exc);
        }
        try {
            conn.rollback();
            out("rollback", "ok");
        } catch (SQLException exc) {
            error("rollback", exc);
        }
        try (Statement st = conn.createStatement();
             ResultSet rs = st.executeQuery("SELECT count(*) FROM orders WHERE status = 'x'")) {
            rs.next();
            out("after_rollback", "count", Long.toString(rs.getLong(1)));
            conn.commit();
        } catch (SQLException exc) {
            error("after_rollback", exc);
        }
    }

    private static void error(String scenario, SQLException exc) {
        out(scenario, "error", String.valueOf(exc.getSQLState()), String.valueOf(exc.getMessage()));
    }

    private static void out(String... fields) {
        StringBuilder line = new StringBuilder();
        for (String field : fields) {
            if (line.length() > 0) {
                line.append('\t');
            }
            line.append(String.valueOf(field).replace('\t', ' ').replace('\n', ' '));
        }
        System.out.println(line);
    }
}
